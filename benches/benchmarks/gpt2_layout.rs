//! GPT-2 small's parameter shapes, shared by the benches and the examples (`#[path]`).

/// GPT-2 small's parameters: wte, wpe, 12 blocks, ln_f (148 tensors, 124,439,808 elements), in
/// the model's registration order.
pub fn gpt2_small() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("wte".to_string(), vec![50257, 768]),
        ("wpe".to_string(), vec![1024, 768]),
    ];
    for i in 0..12 {
        for (s, shape) in [
            ("ln_1.weight", vec![768]),
            ("ln_1.bias", vec![768]),
            ("attn.c_attn.weight", vec![768, 2304]),
            ("attn.c_attn.bias", vec![2304]),
            ("attn.c_proj.weight", vec![768, 768]),
            ("attn.c_proj.bias", vec![768]),
            ("ln_2.weight", vec![768]),
            ("ln_2.bias", vec![768]),
            ("mlp.c_fc.weight", vec![768, 3072]),
            ("mlp.c_fc.bias", vec![3072]),
            ("mlp.c_proj.weight", vec![3072, 768]),
            ("mlp.c_proj.bias", vec![768]),
        ] {
            v.push((format!("h.{i}.{s}"), shape));
        }
    }
    v.push(("ln_f.weight".to_string(), vec![768]));
    v.push(("ln_f.bias".to_string(), vec![768]));
    v
}
