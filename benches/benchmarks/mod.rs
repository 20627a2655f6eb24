pub mod gpt2_layout;
pub mod latency;
pub mod layouts;
pub mod optimizers;
pub mod realistic;
pub mod setup;
pub mod training_loop;
