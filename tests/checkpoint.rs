//! Binary checkpoints: bitwise round trip and continuation for every optimizer, dtype casts,
//! every kind of bad file, atomic save under injected I/O failures and a killed process.

mod common;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use common::{build_arena, write_grads};
use optarena::checkpoint::{self, SaveTarget, StdFs};
use optarena::optim::*;
use optarena::{Algorithm, Arena, Error, Float, HyperValue, MatchBy, Optimizer, Param, ParamGroup};

fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![7, 5],
        vec![5],
        vec![300, 41],
        vec![33],
        vec![1],
        vec![29, 67],
    ]
}
const BLOCKS: [usize; 2] = [3, 3];

fn groups<T: Float>(h: &[Param<T>], group2: &[(&str, HyperValue)]) -> Vec<ParamGroup<T>> {
    let mut g2 = ParamGroup::new(h[3..].iter().copied());
    for (k, v) in group2 {
        g2 = g2.with(k, v.clone());
    }
    vec![ParamGroup::new(h[..3].iter().copied()), g2]
}

/// A unique scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("optarena-ckpt-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every parameter value's bits, by name.
fn param_bits<T: Float>(arena: &Arena<T>) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<_> = arena
        .infos()
        .iter()
        .map(|i| {
            let bits = arena.value_by_name(&i.name).unwrap().iter();
            (i.name.clone(), bits.map(|x| x.to_f64().to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

/// The optimizer's whole state, exactly (JSON with round-trip floats).
fn state_of<T: Float, A: Algorithm>(opt: &Optimizer<T, A>) -> String {
    opt.state_dict_json().unwrap()
}

fn skip_at(t: u64) -> &'static [usize] {
    if t.is_multiple_of(2) {
        &[4]
    } else {
        &[]
    }
}

fn trained<T: Float, A: Algorithm>(
    config: &A::Config,
    group2: &[(&str, HyperValue)],
    steps: u64,
) -> (Arena<T>, Optimizer<T, A>) {
    let (mut arena, h) = build_arena::<T>(&shapes(), 11, &[]);
    let mut opt = Optimizer::<T, A>::new(&arena, groups(&h, group2), config.clone()).unwrap();
    for t in 1..=steps {
        write_grads(&mut arena, t, skip_at(t));
        opt.step(&mut arena).unwrap();
    }
    (arena, opt)
}

/// Save after 4 steps (with the parameters), load into a fresh model with other values and an
/// optimizer with other hyperparameters, continue 3 steps: bitwise the uninterrupted run.
fn round_trip_continue<T: Float, A: Algorithm>(config: A::Config, group2: &[(&str, HyperValue)]) {
    let (uninterrupted, _) = trained::<T, A>(&config, group2, 7);
    // Unique per configuration: tests run in parallel and share A::NAME (sgd, sgd_momentum).
    let dir = scratch(&format!("rt-{}-{}-{:x}", A::NAME, T::DTYPE, {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{config:?}{group2:?}").hash(&mut h);
        h.finish()
    }));
    for by in [MatchBy::Position, MatchBy::Name] {
        let (arena, opt) = trained::<T, A>(&config, group2, 4);
        let path = dir.join("ck.safetensors");
        let size = opt.save_checkpoint(&path, Some(&arena)).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let saved_state = state_of(&opt);
        let saved_params = param_bits(&arena);
        drop((arena, opt));

        let reverse: &[usize] = if by == MatchBy::Name { &BLOCKS } else { &[] };
        let (mut arena, h) = build_arena::<T>(&shapes(), 999, reverse);
        let mut opt =
            Optimizer::<T, A>::new(&arena, groups(&h, &[]), A::Config::default()).unwrap();
        opt.load_checkpoint(&path, Some(&mut arena), by).unwrap();
        assert_eq!(
            param_bits(&arena),
            saved_params,
            "{} params by {by:?}",
            A::NAME
        );
        assert_eq!(opt.group_config(0).unwrap(), &config);
        if by == MatchBy::Position {
            assert_eq!(state_of(&opt), saved_state, "{} state", A::NAME);
        }
        // Saving again gives the same bytes (deterministic files).
        if by == MatchBy::Position {
            let again = dir.join("again.safetensors");
            opt.save_checkpoint(&again, Some(&arena)).unwrap();
            assert_eq!(
                std::fs::read(&again).unwrap(),
                std::fs::read(&path).unwrap()
            );
        }
        for t in 5..=7 {
            write_grads(&mut arena, t, skip_at(t));
            opt.step(&mut arena).unwrap();
        }
        assert_eq!(
            param_bits(&arena),
            param_bits(&uninterrupted),
            "{} resumed by {by:?}",
            A::NAME
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

macro_rules! round_trip_tests {
    ($($name:ident: $alg:ty, $cfg:expr, [$($k:literal => $v:expr),*];)*) => {
        mod round_trip {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let group2: Vec<(&str, HyperValue)> = vec![$(($k, HyperValue::from($v))),*];
                    round_trip_continue::<f32, $alg>($cfg, &group2);
                    round_trip_continue::<f64, $alg>($cfg, &group2);
                }
            )*
        }
    };
}

round_trip_tests! {
    sgd_momentum: SGDAlgorithm, SGDConfig::default().with_lr(0.05).with_momentum(0.9), ["lr" => 0.01];
    sgd_plain: SGDAlgorithm, SGDConfig::default().with_lr(0.05), [];
    adam: AdamAlgorithm, AdamConfig::default().with_lr(0.01), ["amsgrad" => true];
    adamw: AdamWAlgorithm, AdamWConfig::default(), ["weight_decay" => 0.1];
    radam: RAdamAlgorithm, RAdamConfig::default(), [];
    nadam: NAdamAlgorithm, NAdamConfig::default(), [];
    adamax: AdamaxAlgorithm, AdamaxConfig::default(), [];
    adagrad: AdagradAlgorithm, AdagradConfig::default().with_initial_accumulator_value(0.1), [];
    adadelta: AdadeltaAlgorithm, AdadeltaConfig::default(), [];
    rmsprop: RMSpropAlgorithm, RMSpropConfig::default().with_momentum(0.5).with_centered(true), [];
    rprop: RpropAlgorithm, RpropConfig::default(), [];
    asgd: ASGDAlgorithm, ASGDConfig::default().with_t0(2.0), [];
    adafactor: AdafactorAlgorithm, AdafactorConfig::default().with_lr(0.01).with_weight_decay(0.01), ["lr" => 0.02];
}

#[test]
fn state_only_checkpoint_and_inspect() {
    let (arena, opt) = trained::<f32, AdamAlgorithm>(&AdamConfig::default(), &[], 3);
    let dir = scratch("state-only");
    let path = dir.join("s.safetensors");
    opt.save_checkpoint(&path, None).unwrap();
    let info = checkpoint::inspect(&path).unwrap();
    assert_eq!(info.meta.optimizer, "Adam");
    assert_eq!(info.meta.dtype, "float32");
    assert!(info.meta.params.is_none());
    assert_eq!(info.meta.param_groups.len(), 2);
    assert!(info.tensors.iter().any(|t| t.name == "state.0.exp_avg"));
    assert!(info.tensors.iter().all(|t| t.name.starts_with("state.")));
    // Loading it with an arena is an error naming why, and changes nothing.
    let (mut arena2, h) = build_arena::<f32>(&shapes(), 5, &[]);
    let mut opt2 =
        Optimizer::<f32, AdamAlgorithm>::new(&arena2, groups(&h, &[]), AdamConfig::default())
            .unwrap();
    let before = (state_of(&opt2), param_bits(&arena2));
    let e = opt2
        .load_checkpoint(&path, Some(&mut arena2), MatchBy::Name)
        .unwrap_err();
    assert!(e.to_string().contains("holds no parameter values"), "{e}");
    assert_eq!((state_of(&opt2), param_bits(&arena2)), before);
    // Without the arena it loads; a checkpoint with parameters also loads without one.
    opt2.load_checkpoint(&path, None, MatchBy::Name).unwrap();
    assert_eq!(state_of(&opt2), state_of(&opt));
    opt.save_checkpoint(&path, Some(&arena)).unwrap();
    opt2.load_checkpoint(&path, None, MatchBy::Position)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// f64 state into an f32 optimizer and the reverse: cast as torch casts state to the param
/// dtype, the same as the JSON path's load_state_dict.
#[test]
fn dtype_casts_like_load_state_dict() {
    let dir = scratch("cast");
    let path = dir.join("c.safetensors");
    let cfg = AdamConfig::default().with_amsgrad(true);
    let (a64, o64) = trained::<f64, AdamAlgorithm>(&cfg, &[], 3);
    o64.save_checkpoint(&path, Some(&a64)).unwrap();
    let (mut a32, h) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut o32 = Adam::<f32>::new(&a32, groups(&h, &[]), AdamConfig::default()).unwrap();
    o32.load_checkpoint(&path, Some(&mut a32), MatchBy::Position)
        .unwrap();
    let mut via_json = Adam::<f32>::new(&a32, groups(&h, &[]), AdamConfig::default()).unwrap();
    via_json
        .load_state_dict(&o64.state_dict(), MatchBy::Position)
        .unwrap();
    assert_eq!(state_of(&o32), state_of(&via_json));
    for info in a64.infos() {
        let want: Vec<f32> = a64
            .value_by_name(&info.name)
            .unwrap()
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(a32.value_by_name(&info.name).unwrap(), &want[..]);
    }
    // And back: f32 into f64 is exact.
    o32.save_checkpoint(&path, Some(&a32)).unwrap();
    let (mut b64, h) = build_arena::<f64>(&shapes(), 2, &[]);
    let mut p64 = Adam::<f64>::new(&b64, groups(&h, &[]), AdamConfig::default()).unwrap();
    p64.load_checkpoint(&path, Some(&mut b64), MatchBy::Position)
        .unwrap();
    let mut via_json = Adam::<f64>::new(&b64, groups(&h, &[]), AdamConfig::default()).unwrap();
    via_json
        .load_state_dict(&o32.state_dict(), MatchBy::Position)
        .unwrap();
    assert_eq!(state_of(&p64), state_of(&via_json));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bad files

/// A small checkpoint (with parameters) and the fresh optimizer and arena it is loaded into.
fn small_setup() -> (Vec<u8>, Arena<f32>, Adam<f32>) {
    let shapes = vec![vec![3, 2], vec![2], vec![4]];
    let (mut arena, h) = build_arena::<f32>(&shapes, 7, &[]);
    let g = vec![
        ParamGroup::new(h[..2].iter().copied()),
        ParamGroup::new([h[2]]).with("lr", 0.5),
    ];
    let mut opt = Adam::<f32>::new(&arena, g.clone(), AdamConfig::default()).unwrap();
    for t in 1..=2 {
        write_grads(&mut arena, t, &[]);
        opt.step(&mut arena).unwrap();
    }
    let mut bytes = Vec::new();
    checkpoint::write(&mut bytes, &opt, Some(&arena)).unwrap();
    let (fresh_arena, h) = build_arena::<f32>(&shapes, 8, &[]);
    let g = vec![
        ParamGroup::new(h[..2].iter().copied()),
        ParamGroup::new([h[2]]).with("lr", 0.5),
    ];
    let fresh = Adam::<f32>::new(&fresh_arena, g, AdamConfig::default()).unwrap();
    (bytes, fresh_arena, fresh)
}

/// Loads `bytes`, expecting an error; checks nothing changed and returns the message.
fn load_fails(bytes: &[u8], arena: &mut Arena<f32>, opt: &mut Adam<f32>) -> String {
    let before = (state_of(opt), param_bits(arena));
    let r = checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        opt,
        Some(arena),
        MatchBy::Name,
    );
    let e = r.expect_err("a bad checkpoint must not load");
    assert_eq!(
        (state_of(opt), param_bits(arena)),
        before,
        "changed after: {e}"
    );
    e.to_string()
}

#[test]
fn the_small_checkpoint_loads() {
    let (bytes, mut arena, mut opt) = small_setup();
    checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap();
}

#[test]
fn every_truncation_is_an_error_that_says_so() {
    let (bytes, mut arena, mut opt) = small_setup();
    for len in 0..bytes.len() {
        let msg = load_fails(&bytes[..len], &mut arena, &mut opt);
        assert!(
            msg.contains("truncated") || msg.contains("too short"),
            "length {len}: {msg}"
        );
    }
    // A reader that ends early although the length claims more.
    let msg = {
        let before = state_of(&opt);
        let e = checkpoint::read(
            &mut &bytes[..bytes.len() - 3],
            bytes.len() as u64,
            &mut opt,
            Some(&mut arena),
            MatchBy::Name,
        )
        .unwrap_err();
        assert_eq!(state_of(&opt), before);
        e.to_string()
    };
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn every_flipped_byte_is_an_error() {
    let (bytes, mut arena, mut opt) = small_setup();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            let msg = load_fails(&b, &mut arena, &mut opt);
            assert!(!msg.is_empty());
        }
    }
    // A flipped data byte says which checksum failed.
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 4;
    let msg = load_fails(&b, &mut arena, &mut opt);
    assert!(msg.contains("data checksum mismatch"), "{msg}");
    // A flipped header byte that still parses is caught by the header checksum.
    let pat = br#"\"lr\":0.5"#;
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("lr in the header")
        + pat.len()
        - 1;
    let mut b = bytes.clone();
    b[at] = b'7'; // lr 0.5 -> 0.7
    let msg = load_fails(&b, &mut arena, &mut opt);
    assert!(msg.contains("header checksum mismatch"), "{msg}");
}

/// Splits a checkpoint into (metadata JSON value, tensor table JSON, data after the prefix and
/// header), and rebuilds one with valid checksums, to forge files that only differ in meaning.
fn split(
    bytes: &[u8],
) -> (
    serde_json::Value,
    serde_json::Map<String, serde_json::Value>,
    Vec<u8>,
) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = serde_json::from_str(header["__metadata__"]["optarena"].as_str().unwrap()).unwrap();
    (meta, header, bytes[8 + n..].to_vec())
}

fn forge(
    meta: &serde_json::Value,
    mut header: serde_json::Map<String, serde_json::Value>,
    mut data: Vec<u8>,
) -> Vec<u8> {
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "optarena": meta.to_string() }),
    );
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    let header_crc = crc32fast::hash(&out);
    let data_crc = crc32fast::hash(&data[8..]);
    data[..4].copy_from_slice(&header_crc.to_le_bytes());
    data[4..8].copy_from_slice(&data_crc.to_le_bytes());
    out.extend_from_slice(&data);
    out
}

#[test]
fn forged_files_name_what_is_wrong() {
    let (bytes, mut arena, mut opt) = small_setup();
    let (meta, header, data) = split(&bytes);
    // Re-forging without a change loads (the forger is right).
    let same = forge(&meta, header.clone(), data.clone());
    checkpoint::read(
        &mut &same[..],
        same.len() as u64,
        &mut opt,
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap();
    // The metadata's dtype is the saved parameters' (any float type): each tensor carries its
    // own dtype and is cast from it (tests/checkpoint_half.rs), so F32 tensors under a
    // `float64` or `bfloat16` parameter dtype load as they are.
    for dtype in ["float64", "bfloat16"] {
        let mut m = meta.clone();
        m["dtype"] = dtype.into();
        let b = forge(&m, header.clone(), data.clone());
        checkpoint::read(
            &mut &b[..],
            b.len() as u64,
            &mut opt,
            Some(&mut arena),
            MatchBy::Name,
        )
        .unwrap();
    }

    let mut check = |meta: serde_json::Value,
                     header: serde_json::Map<String, serde_json::Value>,
                     data: Vec<u8>,
                     want: &str| {
        let b = forge(&meta, header, data);
        let msg = load_fails(&b, &mut arena, &mut opt);
        assert!(msg.contains(want), "want `{want}` in: {msg}");
    };
    let mut m = meta.clone();
    m["version"] = 2.into();
    check(
        m,
        header.clone(),
        data.clone(),
        "format version 2 is not supported",
    );
    let mut m = meta.clone();
    m["format"] = "something-else".into();
    check(
        m,
        header.clone(),
        data.clone(),
        "not an optarena checkpoint",
    );
    let mut m = meta.clone();
    m["optimizer"] = "SGD".into();
    check(
        m,
        header.clone(),
        data.clone(),
        "saved by the SGD optimizer, this is Adam",
    );
    let mut m = meta.clone();
    m["dtype"] = "int8".into();
    check(
        m,
        header.clone(),
        data.clone(),
        "dtype `int8` is not supported",
    );
    let mut m = meta.clone();
    m["param_groups"][0]["params"][1]["shape"] = serde_json::json!([3]);
    check(
        m,
        header.clone(),
        data.clone(),
        "has shape [3] in the saved state",
    );
    let mut m = meta.clone();
    m["param_groups"][0]["hyperparams"]["lr"] = (-1.0).into();
    check(
        m,
        header.clone(),
        data.clone(),
        "Invalid learning rate: -1.0",
    );
    let mut m = meta.clone();
    m["state"][0]["buffers"] = serde_json::json!(["exp_avg_sq"]);
    check(
        m,
        header.clone(),
        data.clone(),
        "has buffers [\"exp_avg_sq\"]",
    );
    // Leading buffers only: the file's exp_avg_sq tensor is then one too many.
    let mut m = meta.clone();
    m["state"][0]["buffers"] = serde_json::json!(["exp_avg"]);
    check(
        m,
        header.clone(),
        data.clone(),
        "tensor `state.0.exp_avg_sq` is not described by the metadata",
    );
    let mut m = meta.clone();
    m["state"][0]["index"] = 17.into();
    check(
        m,
        header.clone(),
        data.clone(),
        "parameter number 17 which no group lists",
    );
    let mut m = meta.clone();
    m["extra"] = 1.into();
    check(m, header.clone(), data.clone(), "unknown field `extra`");
    // Tensor table: a tensor's shape or dtype, a missing or unknown tensor.
    let mut h = header.clone();
    h["state.0.exp_avg"]["dtype"] = "I32".into();
    check(
        meta.clone(),
        h,
        data.clone(),
        "tensor `state.0.exp_avg` has dtype I32",
    );
    let mut h = header.clone();
    h["state.0.exp_avg"]["shape"] = serde_json::json!([2, 3]);
    check(
        meta.clone(),
        h,
        data.clone(),
        "tensor `state.0.exp_avg` has shape [2, 3]",
    );
    let mut h = header.clone();
    let t = h.remove("param.p0").unwrap();
    h.insert("param.zz".into(), t);
    check(
        meta.clone(),
        h,
        data.clone(),
        "tensor `param.zz` is not described",
    );
    // A forged shape that would need exabytes: rejected by the offsets, nothing allocated.
    let mut h = header.clone();
    h["state.0.exp_avg"]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 20]);
    check(
        meta.clone(),
        h,
        data.clone(),
        "safetensors header does not parse",
    );
    let mut h = header.clone();
    h["state.0.exp_avg"]["data_offsets"] = serde_json::json!([8, 1u64 << 50]);
    check(meta.clone(), h, data.clone(), "header does not parse");
    // No checksum tensor: a plain safetensors file.
    let mut h = header.clone();
    h.remove("optarena.crc32");
    let b = {
        let mut h2 = serde_json::to_vec(&h).unwrap();
        h2.resize(h2.len().next_multiple_of(8), b' ');
        let mut out = (h2.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h2);
        out.extend_from_slice(&data);
        out
    };
    let msg = load_fails(&b, &mut arena, &mut opt);
    assert!(
        msg.contains("header does not parse") || msg.contains("no `optarena.crc32`"),
        "{msg}"
    );
    // A header length beyond the file.
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = load_fails(&b, &mut arena, &mut opt);
    assert!(msg.contains("truncated"), "{msg}");
    // Trailing bytes.
    let mut b = bytes.clone();
    b.extend_from_slice(&[0; 8]);
    let msg = load_fails(&b, &mut arena, &mut opt);
    assert!(msg.contains("trailing bytes"), "{msg}");
}

#[test]
fn another_arena_or_shape_is_refused() {
    let (bytes, _arena, mut opt) = small_setup();
    // The optimizer's own arena must be given.
    let (mut other, _) = build_arena::<f32>(&[vec![3, 2], vec![2], vec![4]], 1, &[]);
    let e = checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        Some(&mut other),
        MatchBy::Name,
    )
    .unwrap_err();
    assert!(matches!(e, Error::ArenaMismatch(_)), "{e}");
    // A model whose parameter has another shape.
    let (mut arena, h) = build_arena::<f32>(&[vec![2, 3], vec![2], vec![4]], 1, &[]);
    let g = vec![
        ParamGroup::new(h[..2].iter().copied()),
        ParamGroup::new([h[2]]).with("lr", 0.5),
    ];
    let mut opt = Adam::<f32>::new(&arena, g, AdamConfig::default()).unwrap();
    let msg = load_fails(&bytes, &mut arena, &mut opt);
    assert!(msg.contains("has shape [3, 2] in the saved state"), "{msg}");
    // Another optimizer kind.
    let (mut arena, h) = build_arena::<f32>(&[vec![3, 2], vec![2], vec![4]], 1, &[]);
    let g = vec![
        ParamGroup::new(h[..2].iter().copied()),
        ParamGroup::new([h[2]]),
    ];
    let mut sgd = SGD::<f32>::new(&arena, g, SGDConfig::default()).unwrap();
    let e = checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut sgd,
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("saved by the Adam optimizer, this is SGD"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Atomic save

/// The real file system, with a write that fails after `fail_after` bytes, or a failing sync,
/// rename or directory sync.
#[derive(Default, Clone, Copy)]
struct Faulty {
    fail_after: Option<usize>,
    fail_sync: bool,
    fail_rename: bool,
    fail_dir_sync: bool,
}

struct FaultyFile {
    file: std::fs::File,
    left: Option<usize>,
}

impl Write for FaultyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.left {
            Some(0) => Err(io::Error::other("injected write failure")),
            Some(left) => {
                let n = buf.len().min(*left);
                let n = self.file.write(&buf[..n])?;
                *left -= n;
                Ok(n)
            }
            None => self.file.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl SaveTarget for Faulty {
    type File = FaultyFile;
    fn create_new(&self, path: &Path) -> io::Result<FaultyFile> {
        Ok(FaultyFile {
            file: StdFs.create_new(path)?,
            left: self.fail_after,
        })
    }
    fn sync_file(&self, f: &mut FaultyFile) -> io::Result<()> {
        if self.fail_sync {
            return Err(io::Error::other("injected fsync failure"));
        }
        StdFs.sync_file(&mut f.file)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if self.fail_rename {
            return Err(io::Error::other("injected rename failure"));
        }
        StdFs.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.fail_dir_sync {
            return Err(io::Error::other("injected directory fsync failure"));
        }
        StdFs.sync_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_failed_save_leaves_the_old_checkpoint() {
    let dir = scratch("atomic");
    let path = dir.join("run.safetensors");
    let cfg = AdamConfig::default();
    let (mut arena, mut opt) = trained::<f32, AdamAlgorithm>(&cfg, &[], 2);
    let old_size = opt.save_checkpoint(&path, Some(&arena)).unwrap() as usize;
    let old_state = state_of(&opt);
    let old_params = param_bits(&arena);
    write_grads(&mut arena, 3, &[]);
    opt.step(&mut arena).unwrap();
    let new_state = state_of(&opt);

    let check_loads = |want_state: &str, want_params: &[(String, Vec<u64>)]| {
        let (mut a, h) = build_arena::<f32>(&shapes(), 5, &[]);
        let mut o = Adam::<f32>::new(&a, groups(&h, &[]), cfg.clone()).unwrap();
        o.load_checkpoint(&path, Some(&mut a), MatchBy::Position)
            .unwrap();
        assert_eq!(state_of(&o), want_state);
        assert_eq!(param_bits(&a), want_params);
    };
    // A write failing after every N bytes, for many N across the file (header, data, end).
    let mut ns: Vec<usize> = (0..64).collect();
    ns.extend((64..old_size + 64).step_by(old_size / 97 + 1));
    ns.extend([old_size - 1, old_size, old_size + 7]);
    let mut failed = 0;
    for n in ns {
        let faulty = Faulty {
            fail_after: Some(n),
            ..Default::default()
        };
        match checkpoint::save_with(&faulty, &path, &opt, Some(&arena)) {
            Err(e) => {
                failed += 1;
                assert!(e.to_string().contains("injected write failure"), "{e}");
                check_loads(&old_state, &old_params);
                assert_eq!(files_in(&dir), ["run.safetensors"], "temporary file left");
            }
            Ok(_) => {
                // The whole file fitted: it is the new one. Put the old one back.
                assert!(n >= old_size, "a save of {n} bytes succeeded");
                check_loads(&new_state, &param_bits(&arena));
                let (a, o) = trained::<f32, AdamAlgorithm>(&cfg, &[], 2);
                o.save_checkpoint(&path, Some(&a)).unwrap();
            }
        }
    }
    assert!(failed > 100, "{failed}");
    for (faulty, msg) in [
        (
            Faulty {
                fail_sync: true,
                ..Default::default()
            },
            "injected fsync failure",
        ),
        (
            Faulty {
                fail_rename: true,
                ..Default::default()
            },
            "injected rename failure",
        ),
    ] {
        let e = checkpoint::save_with(&faulty, &path, &opt, Some(&arena)).unwrap_err();
        assert!(e.to_string().contains(msg), "{e}");
        check_loads(&old_state, &old_params);
        assert_eq!(files_in(&dir), ["run.safetensors"]);
    }
    // The directory sync fails after the rename: the error is reported, and the file in place
    // is the complete new checkpoint.
    let faulty = Faulty {
        fail_dir_sync: true,
        ..Default::default()
    };
    let e = checkpoint::save_with(&faulty, &path, &opt, Some(&arena)).unwrap_err();
    assert!(
        e.to_string().contains("injected directory fsync failure"),
        "{e}"
    );
    check_loads(&new_state, &param_bits(&arena));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A process killed in the middle of saving leaves the previous checkpoint loadable.
///
/// The test runs itself as a child (this test binary with `OPTARENA_CKPT_CHILD` set) that saves
/// a large checkpoint over and over, kills it at several moments, and loads what is on disk.
#[test]
fn killed_mid_save_leaves_a_loadable_checkpoint() {
    const SHAPES: [usize; 2] = [1 << 20, 3 << 18];
    let build = || {
        let mut b = optarena::ArenaBuilder::<f32>::new();
        let w = b
            .param_with("w", &[SHAPES[0]], |i| i as f32 * 1e-6)
            .unwrap();
        let v = b
            .param_with("v", &[SHAPES[1]], |i| -(i as f32) * 1e-6)
            .unwrap();
        let arena = b.build();
        let opt = Adam::<f32>::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
        (arena, opt, w, v)
    };
    if let Ok(dir) = std::env::var("OPTARENA_CKPT_CHILD") {
        // The child: step and save forever, saying after each save which step it holds.
        let path = Path::new(&dir).join("run.safetensors");
        let (mut arena, mut opt, w, v) = build();
        for t in 1.. {
            arena.grad_mut(w).fill(0.01 * t as f32);
            arena.grad_mut(v).fill(-0.02);
            opt.step(&mut arena).unwrap();
            opt.save_checkpoint(&path, Some(&arena)).unwrap();
            println!("saved {t}");
            io::stdout().flush().unwrap();
        }
        return;
    }
    use std::io::BufRead;
    let dir = scratch("killed");
    let path = dir.join("run.safetensors");
    let mut mid_save_kills = 0;
    for (trial, delay_ms) in [0u64, 7, 23, 61, 150].into_iter().enumerate() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "killed_mid_save_leaves_a_loadable_checkpoint",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OPTARENA_CKPT_CHILD", &dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
        // Wait for the first complete save, then kill during a later one.
        let mut last = 0u64;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(t) = line.strip_prefix("saved ") {
                last = t.parse().unwrap();
                if last > trial as u64 % 2 {
                    break;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let temps = files_in(&dir)
            .into_iter()
            .filter(|f| f.ends_with(".tmp"))
            .count();
        if temps > 0 {
            mid_save_kills += 1;
        }
        // What is on disk loads, and holds a complete state of a step at least the last one
        // reported saved.
        let (mut arena, mut opt, w, _) = build();
        opt.load_checkpoint(&path, Some(&mut arena), MatchBy::Name)
            .unwrap_or_else(|e| panic!("trial {trial}: {e}"));
        let step = opt.step_count(w).unwrap();
        assert!(step >= last, "trial {trial}: step {step} < {last}");
        let exp_avg = opt.buffer(w, "exp_avg").unwrap();
        assert!(
            exp_avg.iter().all(|&x| x == exp_avg[0]),
            "trial {trial}: torn exp_avg"
        );
        // The dead child's temporary file is stale, and the next successful save removes it.
        let orphans = checkpoint::atomic::stale_temp_files(&path);
        assert_eq!(orphans.len(), temps, "trial {trial}: {orphans:?}");
        opt.save_checkpoint(&path, Some(&arena)).unwrap();
        assert_eq!(files_in(&dir), ["run.safetensors"], "trial {trial}");
    }
    assert!(mid_save_kills >= 1, "no kill landed during a save");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What a save killed mid-way leaves (`.<name>.<pid>.<n>.tmp` of a dead process) goes with
/// the next successful save of the same checkpoint; a running process's file and other files
/// stay.
#[cfg(target_os = "linux")]
#[test]
fn the_next_save_removes_temp_files_of_dead_processes() {
    let dir = scratch("stale");
    let path = dir.join("run.safetensors");
    let (_, arena, opt) = small_setup();
    opt.save_checkpoint(&path, Some(&arena)).unwrap();
    // u32::MAX is above any Linux pid_max, so no such process exists.
    let dead = ".run.safetensors.4294967295.0.tmp";
    let own = format!(".run.safetensors.{}.999.tmp", std::process::id());
    let others = [
        ".other.safetensors.4294967295.0.tmp",
        ".run.safetensors.x.0.tmp",
    ];
    for f in [dead, own.as_str()].into_iter().chain(others) {
        std::fs::write(dir.join(f), b"partial").unwrap();
    }
    assert_eq!(
        checkpoint::atomic::stale_temp_files(&path),
        [dir.join(dead)]
    );
    opt.save_checkpoint(&path, Some(&arena)).unwrap();
    let mut want: Vec<String> = [own.as_str(), "run.safetensors"]
        .into_iter()
        .chain(others)
        .map(String::from)
        .collect();
    want.sort();
    assert_eq!(files_in(&dir), want);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Found by the `api` fuzz target: a state holding NaN or infinity (after one non-finite
/// gradient) was saved as JSON `null` and could not be loaded. Both formats keep it now.
#[test]
fn non_finite_state_round_trips_in_both_formats() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 3, &[]);
    let mut opt = Adam::<f32>::new(&arena, groups(&h, &[]), AdamConfig::default()).unwrap();
    write_grads(&mut arena, 1, &[]);
    arena.grad_mut(h[0])[0] = f32::NAN;
    arena.grad_mut(h[1])[1] = f32::INFINITY;
    arena.grad_mut(h[1])[2] = f32::NEG_INFINITY;
    opt.step(&mut arena).unwrap();
    let json = opt.state_dict_json().unwrap();
    assert!(
        json.contains("\"NaN\"") && json.contains("\"Infinity\""),
        "{json:.200}"
    );
    let before = state_of(&opt);
    opt.load_state_dict_json(&json, MatchBy::Position).unwrap();
    assert_eq!(state_of(&opt), before);
    let mut bytes = Vec::new();
    checkpoint::write(&mut bytes, &opt, Some(&arena)).unwrap();
    checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap();
    assert_eq!(state_of(&opt), before);
    let sd = opt.state_dict();
    assert!(sd.state[0].buffers["exp_avg"][0].is_nan());
    assert_eq!(sd.state[1].buffers["exp_avg_sq"][1], f32::INFINITY);
}

/// Found by the `api` fuzz target: after a setting that adds a buffer at the end (RMSprop's
/// `momentum`, Adam's `amsgrad`, SGD's `momentum`) is switched on, the state lists fewer
/// buffers until the next step, and such a state dict (JSON or binary) was refused on load.
/// It loads now, and the run continues exactly as it would have.
#[test]
fn state_saved_between_a_buffer_adding_change_and_the_next_step_loads() {
    fn case<A: Algorithm>(config: A::Config, switch: (&str, HyperValue)) {
        let run = |reload: Option<bool>| {
            let (mut arena, h) = build_arena::<f32>(&shapes(), 4, &[]);
            let mut opt =
                Optimizer::<f32, A>::new(&arena, groups(&h, &[]), config.clone()).unwrap();
            write_grads(&mut arena, 1, &[]);
            opt.step(&mut arena).unwrap();
            opt.set_hyper(0, switch.0, switch.1.clone()).unwrap();
            if let Some(binary) = reload {
                let (mut a2, h2) = build_arena::<f32>(&shapes(), 9, &[]);
                let mut o2 =
                    Optimizer::<f32, A>::new(&a2, groups(&h2, &[]), config.clone()).unwrap();
                if binary {
                    let mut bytes = Vec::new();
                    checkpoint::write(&mut bytes, &opt, Some(&arena)).unwrap();
                    checkpoint::read(
                        &mut &bytes[..],
                        bytes.len() as u64,
                        &mut o2,
                        Some(&mut a2),
                        MatchBy::Name,
                    )
                    .unwrap();
                } else {
                    o2.load_state_dict_json(&opt.state_dict_json().unwrap(), MatchBy::Name)
                        .unwrap();
                    for info in arena.infos() {
                        a2.value_by_name_mut(&info.name)
                            .unwrap()
                            .copy_from_slice(arena.value_by_name(&info.name).unwrap());
                    }
                }
                assert_eq!(state_of(&o2), state_of(&opt));
                (arena, opt) = (a2, o2);
            }
            for t in 2..=4 {
                write_grads(&mut arena, t, &[]);
                opt.step(&mut arena).unwrap();
            }
            param_bits(&arena)
        };
        let straight = run(None);
        assert_eq!(run(Some(false)), straight, "{} via JSON", A::NAME);
        assert_eq!(run(Some(true)), straight, "{} via a checkpoint", A::NAME);
    }
    case::<RMSpropAlgorithm>(
        RMSpropConfig::default(),
        ("momentum", HyperValue::Number(0.5)),
    );
    case::<AdamAlgorithm>(AdamConfig::default(), ("amsgrad", HyperValue::Bool(true)));
    case::<SGDAlgorithm>(
        SGDConfig::default().with_lr(0.01),
        ("momentum", HyperValue::Number(0.9)),
    );
}

/// Found by the `api` fuzz target: ASGD's `eta` is kept rounded to f32 as torch keeps it, so a
/// huge (finite) `lr` makes it infinite; saving such a state failed (binary) or wrote `null`
/// that never loaded (JSON).
#[test]
fn non_finite_scalar_state_round_trips() {
    let (mut arena, h) = build_arena::<f64>(&shapes(), 3, &[]);
    let cfg = ASGDConfig::default().with_lr(1e300);
    let mut opt = ASGD::<f64>::new(&arena, groups(&h, &[]), cfg).unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    let eta = opt.state_dict().state[0].scalars["eta"];
    assert!(eta.is_infinite(), "{eta}");
    let before = state_of(&opt);
    assert!(before.contains("\"eta\":\"Infinity\""), "{before:.300}");
    opt.load_state_dict_json(&before, MatchBy::Position)
        .unwrap();
    assert_eq!(state_of(&opt), before);
    let mut bytes = Vec::new();
    checkpoint::write(&mut bytes, &opt, Some(&arena)).unwrap();
    checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        Some(&mut arena),
        MatchBy::Name,
    )
    .unwrap();
    assert_eq!(state_of(&opt), before);
}

/// Found by the `api` fuzz target: ASGD accepts `t0 = inf` (as torch does: never average),
/// which JSON wrote as `null`; such a state saved (JSON) but never loaded, and the binary save
/// refused it.
#[test]
fn infinite_hyperparameter_round_trips() {
    let (mut arena, h) = build_arena::<f32>(&shapes(), 3, &[]);
    let cfg = ASGDConfig::default().with_t0(f64::INFINITY);
    let mut opt = ASGD::<f32>::new(
        &arena,
        groups(&h, &[("lambd", HyperValue::Number(0.5))]),
        cfg,
    )
    .unwrap();
    write_grads(&mut arena, 1, &[]);
    opt.step(&mut arena).unwrap();
    let before = state_of(&opt);
    assert!(before.contains("\"t0\":\"Infinity\""), "{before:.300}");
    let (mut a2, h2) = build_arena::<f32>(&shapes(), 4, &[]);
    let mut o2 = ASGD::<f32>::new(&a2, groups(&h2, &[]), ASGDConfig::default()).unwrap();
    o2.load_state_dict_json(&before, MatchBy::Position).unwrap();
    assert_eq!(state_of(&o2), before);
    assert_eq!(o2.group_config(0).unwrap().t0, f64::INFINITY);
    let mut bytes = Vec::new();
    checkpoint::write(&mut bytes, &opt, Some(&arena)).unwrap();
    let mut o3 = ASGD::<f32>::new(&a2, groups(&h2, &[]), ASGDConfig::default()).unwrap();
    checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut o3,
        Some(&mut a2),
        MatchBy::Name,
    )
    .unwrap();
    assert_eq!(state_of(&o3), before);
}

#[test]
fn a_json_state_dict_given_to_the_binary_loader_is_named_as_such() {
    let (bytes, mut arena, mut opt) = small_setup();
    let mut source = Adam::<f32>::new(&arena, [ParamGroup::all()], AdamConfig::default()).unwrap();
    write_grads(&mut arena, 1, &[]);
    source.step(&mut arena).unwrap();
    let json = source.state_dict_json().unwrap();
    let e = load_fails(json.as_bytes(), &mut arena, &mut opt);
    assert!(e.contains("not an optarena checkpoint"), "{e}");
    assert!(e.contains("JSON"), "{e}");
    let e = load_fails(b"hello, world: plain text", &mut arena, &mut opt);
    assert!(e.contains("not an optarena checkpoint"), "{e}");
    // A real checkpoint's first bytes are a small binary length, never text.
    assert!(!load_fails(&bytes[..bytes.len() - 1], &mut arena, &mut opt)
        .contains("not an optarena checkpoint"));
}

#[test]
fn saves_to_a_directory_are_refused_before_anything_is_written() {
    let (_, arena, opt) = small_setup();
    let dir = scratch("dir-target");
    let with_slash = PathBuf::from(format!("{}/ckpt/", dir.display()));
    let e = opt
        .save_checkpoint(&with_slash, Some(&arena))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ends in a path separator"), "{e}");
    let e = opt
        .save_checkpoint(&dir, Some(&arena))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "a refused save wrote {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JSON state dict saved in one float type loads into an optimizer of the other, cast as
/// torch casts (and as the typed `load_state_dict` and the binary checkpoint do), both ways.
#[test]
fn json_state_dicts_cast_across_dtypes_both_ways() {
    let cfg = AdamConfig::default().with_amsgrad(true);
    let (_, o64) = trained::<f64, AdamAlgorithm>(&cfg, &[], 3);
    let (a32, h) = build_arena::<f32>(&shapes(), 1, &[]);
    let mut from_json = Adam::<f32>::new(&a32, groups(&h, &[]), AdamConfig::default()).unwrap();
    from_json
        .load_state_dict_json(&o64.state_dict_json().unwrap(), MatchBy::Name)
        .unwrap();
    let mut typed = Adam::<f32>::new(&a32, groups(&h, &[]), AdamConfig::default()).unwrap();
    typed
        .load_state_dict(&o64.state_dict(), MatchBy::Name)
        .unwrap();
    assert_eq!(state_of(&from_json), state_of(&typed));
    assert_eq!(from_json.state_dict().dtype, "float32");

    // And back: f32 into f64 is exact.
    let (b64, h) = build_arena::<f64>(&shapes(), 2, &[]);
    let mut back = Adam::<f64>::new(&b64, groups(&h, &[]), AdamConfig::default()).unwrap();
    back.load_state_dict_json(&from_json.state_dict_json().unwrap(), MatchBy::Name)
        .unwrap();
    let mut typed = Adam::<f64>::new(&b64, groups(&h, &[]), AdamConfig::default()).unwrap();
    typed
        .load_state_dict(&from_json.state_dict(), MatchBy::Name)
        .unwrap();
    assert_eq!(state_of(&back), state_of(&typed));

    // A JSON document without a dtype is still an error that says what is missing.
    let e = back.load_state_dict_json("{}", MatchBy::Name).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
}
