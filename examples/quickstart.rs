//! The smallest complete training loop: least-squares regression with AdamW, a state-dict save
//! and a resume. `cargo run --release --example quickstart`.

use optarena::{AdamW, AdamWConfig, ArenaBuilder, MatchBy, ParamGroup};

fn main() -> Result<(), optarena::Error> {
    // Data: y = X·w* + b* with 256 samples of 16 features (a fixed pseudo-random X).
    let (n, d) = (256usize, 16usize);
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    let w_true: Vec<f32> = (0..d).map(|j| (j as f32 - 8.0) / 4.0).collect();
    let y: Vec<f32> = (0..n)
        .map(|i| (0..d).map(|j| x[i * d + j] * w_true[j]).sum::<f32>() + 0.5)
        .collect();

    let mut b = ArenaBuilder::<f32>::new();
    let w = b.zeros("linear.weight", &[d])?;
    let bias = b.zeros("linear.bias", &[1])?;
    let mut arena = b.build();

    // Two groups as in torch: no weight decay on the bias.
    let mut opt = AdamW::new(
        &arena,
        [
            ParamGroup::new([w]),
            ParamGroup::new([bias]).with("weight_decay", 0.0),
        ],
        AdamWConfig::default().with_lr(0.05),
    )?;

    // The closure finds parameters by name, so it serves the resumed model too.
    let loss_and_grads = |arena: &mut optarena::Arena<f32>| -> f32 {
        let (w, bias) = (
            arena.find("linear.weight").unwrap(),
            arena.find("linear.bias").unwrap(),
        );
        let wv = arena.value(w).to_vec();
        let bv = arena.value(bias)[0];
        let mut loss = 0.0;
        let mut gw = vec![0.0f32; d];
        let mut gb = 0.0f32;
        for i in 0..n {
            let row = &x[i * d..(i + 1) * d];
            let err = row.iter().zip(&wv).map(|(a, b)| a * b).sum::<f32>() + bv - y[i];
            loss += err * err / n as f32;
            for j in 0..d {
                gw[j] += 2.0 * err * row[j] / n as f32;
            }
            gb += 2.0 * err / n as f32;
        }
        arena.set_grad(w, &gw).expect("shape");
        arena.set_grad(bias, &[gb]).expect("shape");
        loss
    };

    for epoch in 0..300 {
        opt.zero_grad(&mut arena, true)?;
        let loss = loss_and_grads(&mut arena);
        opt.step(&mut arena)?;
        if epoch % 50 == 0 {
            println!("step {epoch:4}  loss {loss:.6}");
        }
    }

    // Save, rebuild everything from scratch, load, and keep going.
    let checkpoint = opt.state_dict_json()?;
    let weights = arena.params().to_vec();
    let mut b = ArenaBuilder::<f32>::new();
    let w2 = b.zeros("linear.weight", &[d])?;
    let bias2 = b.zeros("linear.bias", &[1])?;
    let mut arena2 = b.build();
    arena2.params_mut().copy_from_slice(&weights);
    let mut opt2 = AdamW::new(
        &arena2,
        [ParamGroup::new([w2]), ParamGroup::new([bias2])],
        AdamWConfig::default(),
    )?;
    opt2.load_state_dict_json(&checkpoint, MatchBy::Name)?;
    let mut loss = 0.0;
    for _ in 0..100 {
        opt2.zero_grad(&mut arena2, true)?;
        loss = loss_and_grads(&mut arena2);
        opt2.step(&mut arena2)?;
    }
    println!(
        "after resume: loss {loss:.2e}, lr {} (restored from the checkpoint)",
        opt2.lr(0)?
    );
    println!("bias {:.4} (true 0.5)", arena2.value(bias2)[0]);
    Ok(())
}
