pub mod latency;
pub mod layouts;
pub mod optimizers;
pub mod setup;
