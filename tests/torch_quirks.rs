//! torch behaviours the fixture trajectories do not reach: state kept in torch's scalar
//! dtype, values torch ignores, state torch creates eagerly. Each expected value was printed
//! by PyTorch 2.15 (the snippet is beside it).

use optarena::optim::*;
use optarena::{ArenaBuilder, MatchBy, ParamGroup};

/// NAdam's `mu_product` is a float32 tensor in torch, also for float64 parameters, and
/// `mu_product *= mu` rounds to f32 every step.
#[test]
fn nadam_mu_product_is_torchs_float32_value() {
    // p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)); o = torch.optim.NAdam([p])
    // 5 x (p.grad = torch.ones(3, dtype=torch.float64); o.step())
    // o.state_dict()["state"][0]["mu_product"].item() == 0.01849803701043129 (torch.float32)
    let mut b = ArenaBuilder::<f64>::new();
    let p = b.zeros("p", &[3]).unwrap();
    let mut arena = b.build();
    let mut opt = NAdam::new(&arena, [ParamGroup::all()], NAdamConfig::default()).unwrap();
    for _ in 0..5 {
        arena.set_grad(p, &[1.0; 3]).unwrap();
        opt.step(&mut arena).unwrap();
    }
    let sd = opt.state_dict();
    assert_eq!(sd.state[0].step, Some(5));
    assert_eq!(sd.state[0].scalars["mu_product"], 0.01849803701043129);
    // The state dict round-trips it exactly, and a value that is not an f32 is rounded on
    // load, as torch's `__setstate__` puts it in a float32 tensor.
    let json = opt.state_dict_json().unwrap();
    opt.load_state_dict_json(&json, MatchBy::Name).unwrap();
    assert_eq!(opt.state_dict(), sd);
    let mut odd = sd.clone();
    odd.state[0].scalars.insert("mu_product".into(), 0.1);
    opt.load_state_dict(&odd, MatchBy::Position).unwrap();
    assert_eq!(
        opt.state_dict().state[0].scalars["mu_product"],
        0.1f32 as f64
    );
}

/// torch's Adagrad fills `sum` with the constructor's `initial_accumulator_value`, whatever a
/// group says, in `__init__` and in its lazy path (groups added later) alike.
#[test]
fn adagrad_uses_the_constructor_initial_accumulator_value() {
    // p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    // o = torch.optim.Adagrad([{"params": [p], "initial_accumulator_value": 5.0}],
    //                         initial_accumulator_value=0.25, lr=0.1)
    // p.grad = torch.tensor([0.5, 1.0]); o.step()
    // p -> [0.9292893409729004, -2.089442729949951]; state sum -> [0.5, 1.25], step 1
    let mut b = ArenaBuilder::<f32>::new();
    let p = b.param("p", &[2], &[1.0, -2.0]).unwrap();
    let q = b.param("q", &[1], &[3.0]).unwrap();
    let mut arena = b.build();
    let defaults = AdagradConfig::default()
        .with_lr(0.1)
        .with_initial_accumulator_value(0.25);
    let mut opt = Adagrad::new(
        &arena,
        [ParamGroup::new([p]).with("initial_accumulator_value", 5.0)],
        defaults,
    )
    .unwrap();
    opt.add_param_group(
        &arena,
        ParamGroup::new([q]).with("initial_accumulator_value", 7.0),
    )
    .unwrap();
    arena.set_grad(p, &[0.5, 1.0]).unwrap();
    arena.set_grad(q, &[1.0]).unwrap();
    opt.step(&mut arena).unwrap();
    assert_eq!(arena.value(p), &[0.929_289_34f32, -2.089_442_7]);
    assert_eq!(opt.buffer(p, "sum").unwrap(), &[0.5f32, 1.25]);
    assert_eq!(opt.buffer(q, "sum").unwrap(), &[1.25f32]);
    // The group keeps its value, as torch's param group dict does.
    assert_eq!(
        opt.hyper(0, "initial_accumulator_value").unwrap(),
        optarena::HyperValue::Number(5.0)
    );
}

/// torch creates Adagrad's state at construction: a parameter that never had a gradient is
/// in its state dict with `step: 0` and its initial `sum`. optarena creates state on the
/// first gradient; such a torch-style entry loads and continues the same way.
#[test]
fn adagrad_step_zero_state_loads_and_continues() {
    let build = || {
        let mut b = ArenaBuilder::<f64>::new();
        let p = b.param("p", &[2], &[1.0, -2.0]).unwrap();
        let q = b.param("q", &[3], &[0.5, 0.25, -1.0]).unwrap();
        let arena = b.build();
        let config = AdagradConfig::default()
            .with_lr(0.1)
            .with_lr_decay(0.5)
            .with_initial_accumulator_value(0.3);
        let opt = Adagrad::new(&arena, [ParamGroup::all()], config).unwrap();
        (arena, p, q, opt)
    };
    // Lazily: q gets its first gradient at step 2 of p.
    let (mut a1, p1, q1, mut o1) = build();
    a1.set_grad(p1, &[0.5, 1.0]).unwrap();
    o1.step(&mut a1).unwrap();
    let sd = o1.state_dict();
    assert_eq!(
        sd.state.len(),
        1,
        "q has no state before its first gradient"
    );
    assert_eq!(o1.step_count(q1), None);
    // torch's state dict at that point also lists q: {"step": 0, "sum": [0.3, 0.3, 0.3]}.
    let (mut a2, p2, q2, mut o2) = build();
    a2.value_mut(p2).copy_from_slice(a1.value(p1));
    let mut torch_like = sd.clone();
    let mut q_state = torch_like.state[0].clone();
    q_state.index = 1;
    q_state.step = Some(0);
    q_state.buffers.insert("sum".into(), vec![0.3; 3]);
    torch_like.state.push(q_state);
    o2.load_state_dict(&torch_like, MatchBy::Position).unwrap();
    assert_eq!(o2.step_count(q2), Some(0));
    for (arena, p, q, opt) in [(&mut a1, p1, q1, &mut o1), (&mut a2, p2, q2, &mut o2)] {
        arena.set_grad(p, &[0.25, -0.5]).unwrap();
        arena.set_grad(q, &[1.0, -1.0, 0.5]).unwrap();
        opt.step(arena).unwrap();
    }
    assert_eq!(a1.value(p1), a2.value(p2));
    assert_eq!(a1.value(q1), a2.value(q2));
    assert_eq!(o1.state_dict(), o2.state_dict());
    assert_eq!(o1.step_count(q1), Some(1));
}
