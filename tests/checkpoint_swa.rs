//! Binary checkpoints of `AveragedModel` and `SparseAdam` (`checkpoint::averaged`,
//! `checkpoint::sparse_adam`): a round trip continues bitwise, also into an arena that
//! registered its parameters in another order; f32 and f64 cast both ways; every truncation,
//! flipped byte, forged header and mismatch is an error that names the problem and changes
//! nothing; a failed save leaves the previous file.

mod common;

use std::io;
use std::path::{Path, PathBuf};

use common::Rng;
use optarena::checkpoint::{self, SaveTarget};
use optarena::{
    Arena, ArenaBuilder, AverageFn, AveragedModel, Float, Param, SparseAdam, SparseAdamConfig,
    SparseGrad,
};

fn bits<T: Float>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("optarena-ckpt-swa-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SHAPES: [(&str, &[usize]); 4] = [
    ("fc1.weight", &[6, 5]),
    ("fc1.bias", &[6]),
    ("fc2.weight", &[3, 6]),
    ("scale", &[1]),
];

/// An arena of [`SHAPES`], registered in `order`, values from `seed` by name (so two arenas of
/// one seed hold the same values whatever their order).
fn arena<T: Float>(order: &[usize], seed: u64) -> Arena<T> {
    let mut b = ArenaBuilder::<T>::new();
    for &k in order {
        let (name, shape) = SHAPES[k];
        let mut rng = Rng(seed * 100 + k as u64);
        let n = shape.iter().product();
        b.param(name, shape, &rng.vec::<T>(n, 1.0)).unwrap();
    }
    b.build()
}

/// Moves every parameter a little (a stand-in for a training step), deterministically by name.
fn perturb<T: Float>(a: &mut Arena<T>, t: u64) {
    let names: Vec<String> = a.infos().iter().map(|i| i.name.clone()).collect();
    for name in names {
        let p = a.find(&name).unwrap();
        let k = SHAPES.iter().position(|s| s.0 == name).unwrap() as u64;
        let mut rng = Rng(1000 * t + k);
        let d = rng.vec::<T>(a.value(p).len(), 0.1);
        for (x, dx) in a.value_mut(p).iter_mut().zip(d) {
            *x = *x + dx;
        }
    }
}

/// Averaged values by name, bitwise.
fn averaged_by_name<T: Float>(m: &AveragedModel<T>) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<(String, Vec<u64>)> = SHAPES
        .iter()
        .map(|(n, _)| (n.to_string(), bits(m.value_by_name(n).unwrap())))
        .collect();
    v.sort();
    v
}

fn avg_observe<T: Float>(m: &AveragedModel<T>) -> (String, u64, Vec<u64>) {
    (
        format!("{:?}", m.avg_fn()),
        m.n_averaged(),
        bits(m.averaged()),
    )
}

fn avg_kinds() -> [AverageFn; 3] {
    [
        AverageFn::Swa,
        AverageFn::ema(0.9).unwrap(),
        AverageFn::ema(0.25).unwrap(),
    ]
}

#[test]
fn averaged_round_trip_continues_bitwise_in_another_registration_order() {
    fn case<T: Float>(avg: AverageFn) {
        let dir = scratch(&format!("avg-rt-{}-{avg:?}", T::DTYPE));
        let path = dir.join("swa.safetensors");
        let mut a = arena::<T>(&[0, 1, 2, 3], 1);
        let mut m = AveragedModel::with_avg_fn(&a, avg).unwrap();
        for t in 0..3 {
            perturb(&mut a, t);
            m.update_parameters(&a).unwrap();
        }
        let size = m.save_checkpoint(&path).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        // The same model in another registration order, other values, loads by name.
        let mut b = arena::<T>(&[3, 2, 0, 1], 1);
        for t in 0..3 {
            perturb(&mut b, t);
        }
        let mut m2 = AveragedModel::with_avg_fn(&arena::<T>(&[3, 2, 0, 1], 9), avg).unwrap();
        assert_eq!(m2.load_checkpoint(&path).unwrap(), size);
        assert_eq!(m2.n_averaged(), 3);
        assert_eq!(averaged_by_name(&m2), averaged_by_name(&m));
        // Both continue alike.
        for t in 3..6 {
            perturb(&mut a, t);
            perturb(&mut b, t);
            m.update_parameters(&a).unwrap();
            m2.update_parameters(&b).unwrap();
        }
        assert_eq!(averaged_by_name(&m2), averaged_by_name(&m));
        assert_eq!(m2.n_averaged(), 6);
        // The same order reloads the very buffer.
        let mut m3 = AveragedModel::with_avg_fn(&a, avg).unwrap();
        m.save_checkpoint(&path).unwrap();
        m3.load_checkpoint(&path).unwrap();
        assert_eq!(avg_observe(&m3), avg_observe(&m));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    for avg in avg_kinds() {
        case::<f32>(avg);
        case::<f64>(avg);
    }
}

#[test]
fn averaged_file_is_torchs_state_dict_layout() {
    let a = arena::<f32>(&[0, 1, 2, 3], 2);
    let mut m = AveragedModel::ema(&a, 0.5).unwrap();
    m.update_parameters(&a).unwrap();
    m.update_parameters(&a).unwrap();
    let mut bytes = Vec::new();
    checkpoint::averaged::write(&mut bytes, &m).unwrap();
    let info = checkpoint::inspect_reader(&mut &bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(info.meta.optimizer, "AveragedModel");
    let names: Vec<&str> = info.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "module.fc1.weight",
            "module.fc1.bias",
            "module.fc2.weight",
            "module.scale",
            "n_averaged"
        ]
    );
    let n = info.tensors.last().unwrap();
    assert_eq!(
        (n.dtype, n.shape.as_slice()),
        (safetensors::Dtype::I64, &[][..])
    );
    // n_averaged's bytes are the file's last eight: 2 as int64.
    assert_eq!(bytes[bytes.len() - 8..], 2i64.to_le_bytes());
    let g = &info.meta.param_groups[0];
    assert_eq!(
        g.hyperparams["avg_fn"],
        optarena::HyperValue::Str("ema".into())
    );
    assert_eq!(g.hyperparams["decay"], optarena::HyperValue::Number(0.5));
    let offsets: Vec<(String, usize)> = g
        .params
        .iter()
        .map(|p| (p.name.clone(), p.offset))
        .collect();
    let want: Vec<(String, usize)> = a
        .infos()
        .iter()
        .map(|i| (i.name.clone(), i.offset))
        .collect();
    assert_eq!(offsets, want);
}

#[test]
fn averaged_casts_between_f32_and_f64() {
    let a64 = arena::<f64>(&[0, 1, 2, 3], 3);
    let mut m64 = AveragedModel::new(&a64);
    let mut b64 = arena::<f64>(&[0, 1, 2, 3], 3);
    for t in 0..3 {
        perturb(&mut b64, t);
        m64.update_parameters(&b64).unwrap();
    }
    let mut bytes = Vec::new();
    checkpoint::averaged::write(&mut bytes, &m64).unwrap();
    let mut m32 = AveragedModel::new(&arena::<f32>(&[2, 0, 3, 1], 3));
    checkpoint::averaged::read(&mut &bytes[..], bytes.len() as u64, &mut m32).unwrap();
    assert_eq!(m32.n_averaged(), 3);
    for (name, _) in SHAPES {
        let want: Vec<f32> = m64
            .value_by_name(name)
            .unwrap()
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(
            bits(m32.value_by_name(name).unwrap()),
            bits(&want),
            "{name}"
        );
    }
    // And back: f32 values are exact in f64.
    let mut bytes32 = Vec::new();
    checkpoint::averaged::write(&mut bytes32, &m32).unwrap();
    checkpoint::averaged::read(&mut &bytes32[..], bytes32.len() as u64, &mut m64).unwrap();
    for (name, _) in SHAPES {
        let want: Vec<f64> = m32
            .value_by_name(name)
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect();
        assert_eq!(
            bits(m64.value_by_name(name).unwrap()),
            bits(&want),
            "{name}"
        );
    }
}

/// A saved EMA(0.9) model with three updates, and a fresh EMA(0.9) model to load it into.
fn avg_setup() -> (Vec<u8>, AveragedModel<f32>) {
    let mut a = arena::<f32>(&[0, 1, 2, 3], 4);
    let mut m = AveragedModel::ema(&a, 0.9).unwrap();
    for t in 0..3 {
        perturb(&mut a, t);
        m.update_parameters(&a).unwrap();
    }
    let mut bytes = Vec::new();
    checkpoint::averaged::write(&mut bytes, &m).unwrap();
    let fresh = AveragedModel::ema(&arena::<f32>(&[0, 1, 2, 3], 5), 0.9).unwrap();
    (bytes, fresh)
}

fn avg_load_fails(bytes: &[u8], m: &mut AveragedModel<f32>) -> String {
    let before = avg_observe(m);
    let e = checkpoint::averaged::read(&mut &bytes[..], bytes.len() as u64, m)
        .expect_err("a bad checkpoint must not load");
    assert_eq!(avg_observe(m), before, "changed after: {e}");
    e.to_string()
}

#[test]
fn averaged_truncations_and_flipped_bytes_are_errors_that_change_nothing() {
    let (bytes, mut m) = avg_setup();
    for len in 0..bytes.len() {
        let msg = avg_load_fails(&bytes[..len], &mut m);
        assert!(
            msg.contains("truncated") || msg.contains("too short"),
            "length {len}: {msg}"
        );
    }
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= mask;
            avg_load_fails(&b, &mut m);
        }
    }
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1; // n_averaged
    assert!(avg_load_fails(&b, &mut m).contains("data checksum mismatch"));
    // The intact file loads.
    checkpoint::averaged::read(&mut &bytes[..], bytes.len() as u64, &mut m).unwrap();
    assert_eq!(m.n_averaged(), 3);
}

type Json = serde_json::Value;
type Table = serde_json::Map<String, Json>;

/// Splits a checkpoint into (metadata, tensor table, data after the header).
fn split(bytes: &[u8]) -> (Json, Table, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Table = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = serde_json::from_str(header["__metadata__"]["optarena"].as_str().unwrap()).unwrap();
    (meta, header, bytes[8 + n..].to_vec())
}

/// Rebuilds a checkpoint with valid checksums, so a forged file is refused for its meaning.
fn forge(meta: &Json, mut header: Table, mut data: Vec<u8>) -> Vec<u8> {
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
fn averaged_mismatches_and_forgeries_name_what_is_wrong() {
    let (bytes, mut m) = avg_setup();
    let (meta, header, data) = split(&bytes);
    // Re-forging without a change loads (the forger is right).
    let same = forge(&meta, header.clone(), data.clone());
    let mut probe = AveragedModel::ema(&arena::<f32>(&[0, 1, 2, 3], 5), 0.9).unwrap();
    checkpoint::averaged::read(&mut &same[..], same.len() as u64, &mut probe).unwrap();
    assert_eq!(probe.n_averaged(), 3);
    type Edit = Box<dyn Fn(&mut Json, &mut Table, &mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "averaged with SWA's equal mean, this model averages with an EMA with decay 0.9",
            Box::new(|m, _, _| {
                m["param_groups"][0]["hyperparams"]["avg_fn"] = "swa".into();
                m["param_groups"][0]["hyperparams"]["decay"] = Json::Null;
            }),
        ),
        (
            "an EMA with decay 0.8, this model averages with an EMA with decay 0.9",
            Box::new(|m, _, _| m["param_groups"][0]["hyperparams"]["decay"] = 0.8.into()),
        ),
        (
            "Invalid decay value 1.5",
            Box::new(|m, _, _| m["param_groups"][0]["hyperparams"]["decay"] = 1.5.into()),
        ),
        (
            "expected avg_fn and decay",
            Box::new(|m, _, _| m["param_groups"][0]["hyperparams"]["lr"] = 0.1.into()),
        ),
        (
            "saved by Adam, not by an AveragedModel",
            Box::new(|m, _, _| m["optimizer"] = "Adam".into()),
        ),
        (
            "stores parameter `fc3.weight`, which this model does not have",
            Box::new(|m, _, _| m["param_groups"][0]["params"][0]["name"] = "fc3.weight".into()),
        ),
        (
            "`fc1.bias` has shape [2, 3] in the checkpoint and [6]",
            Box::new(|m, _, _| {
                m["param_groups"][0]["params"][1]["shape"] = serde_json::json!([2, 3])
            }),
        ),
        (
            "does not store parameter `scale`",
            Box::new(|m, h, _| {
                m["param_groups"][0]["params"].as_array_mut().unwrap().pop();
                // The tensor stays in the table: its data must still be accounted for.
                let _ = h;
            }),
        ),
        (
            "one param group, this one has 2",
            Box::new(|m, _, _| {
                let g = m["param_groups"][0].clone();
                m["param_groups"].as_array_mut().unwrap().push(g);
            }),
        ),
        (
            "tensor `n_averaged` has dtype F64, it must be I64",
            Box::new(|_, h, _| h["n_averaged"]["dtype"] = "F64".into()),
        ),
        (
            "tensor `module.fc1.bias` has shape [2, 3], the metadata says [6]",
            Box::new(|_, h, _| h["module.fc1.bias"]["shape"] = serde_json::json!([2, 3])),
        ),
        (
            "n_averaged is -1, a negative count",
            Box::new(|_, _, d| {
                let at = d.len() - 8;
                d[at..].copy_from_slice(&(-1i64).to_le_bytes());
            }),
        ),
        (
            "tensor `n_averaged` is described by the metadata but missing",
            Box::new(|_, h, d| {
                h.remove("n_averaged");
                d.truncate(d.len() - 8);
            }),
        ),
        (
            "format version 2 is not supported",
            Box::new(|m, _, _| m["version"] = 2.into()),
        ),
    ];
    for (want, edit) in cases {
        let (mut meta, mut header, mut data) = (meta.clone(), header.clone(), data.clone());
        edit(&mut meta, &mut header, &mut data);
        let b = forge(&meta, header, data);
        let msg = avg_load_fails(&b, &mut m);
        assert!(msg.contains(want), "want `{want}`, got `{msg}`");
    }
    // A model of other parameters.
    let mut b = ArenaBuilder::<f32>::new();
    b.zeros("fc1.weight", &[6, 5]).unwrap();
    let mut other = AveragedModel::ema(&b.build(), 0.9).unwrap();
    let before = avg_observe(&other);
    let e = checkpoint::averaged::read(&mut &bytes[..], bytes.len() as u64, &mut other)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`fc1.bias`, which this model does not have"),
        "{e}"
    );
    assert_eq!(avg_observe(&other), before);
    // An optimizer checkpoint, and a JSON state.
    let a = arena::<f32>(&[0, 1, 2, 3], 4);
    let opt = optarena::Adam::new(
        &a,
        [optarena::ParamGroup::all()],
        optarena::AdamConfig::default(),
    )
    .unwrap();
    let mut adam = Vec::new();
    checkpoint::write(&mut adam, &opt, None).unwrap();
    assert!(avg_load_fails(&adam, &mut m).contains("saved by Adam"));
    let json = m.state_dict_json().unwrap();
    assert!(avg_load_fails(json.as_bytes(), &mut m).contains("like a JSON document"));
    // And the reverse: an AveragedModel file is not an optimizer checkpoint.
    let mut opt = opt;
    let e = checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        None,
        optarena::MatchBy::Name,
    )
    .unwrap_err();
    assert!(e.to_string().contains("AveragedModel"), "{e}");
}

#[test]
fn a_swapped_model_refuses_to_save_or_load() {
    let dir = scratch("swapped");
    let path = dir.join("m.safetensors");
    let mut a = arena::<f64>(&[0, 1, 2, 3], 6);
    let mut m = AveragedModel::new(&a);
    m.update_parameters(&a).unwrap();
    m.save_checkpoint(&path).unwrap();
    let saved = std::fs::read(&path).unwrap();
    m.swap_into(&mut a).unwrap();
    let e = m.save_checkpoint(&path).unwrap_err().to_string();
    assert!(e.contains("swapped"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), saved);
    let before = bits(m.averaged());
    let e = m.load_checkpoint(&path).unwrap_err().to_string();
    assert!(e.contains("swapped"), "{e}");
    assert_eq!(bits(m.averaged()), before);
    m.swap_into(&mut a).unwrap();
    m.load_checkpoint(&path).unwrap();
    // Nothing but the checkpoint in the directory: no temporary files left.
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A file system whose rename fails: the save must leave the previous file and no temporary.
struct FailingRename;

impl SaveTarget for FailingRename {
    type File = std::fs::File;
    fn create_new(&self, path: &Path) -> io::Result<std::fs::File> {
        checkpoint::StdFs.create_new(path)
    }
    fn sync_file(&self, f: &mut std::fs::File) -> io::Result<()> {
        checkpoint::StdFs.sync_file(f)
    }
    fn rename(&self, _: &Path, _: &Path) -> io::Result<()> {
        Err(io::Error::other("injected rename failure"))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        checkpoint::StdFs.sync_dir(dir)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        checkpoint::StdFs.remove_file(path)
    }
}

#[test]
fn failed_saves_leave_the_previous_checkpoint() {
    let dir = scratch("failed-save");
    // AveragedModel.
    let path = dir.join("avg.safetensors");
    let mut a = arena::<f32>(&[0, 1, 2, 3], 7);
    let mut m = AveragedModel::new(&a);
    m.update_parameters(&a).unwrap();
    m.save_checkpoint(&path).unwrap();
    let old = std::fs::read(&path).unwrap();
    perturb(&mut a, 1);
    m.update_parameters(&a).unwrap();
    let e = checkpoint::averaged::save_with(&FailingRename, &path, &m).unwrap_err();
    assert!(e.to_string().contains("injected rename failure"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), old);
    // SparseAdam.
    let spath = dir.join("spa.safetensors");
    let (mut sa, emb, _) = table::<f32>(20, 3, &[0, 1]);
    let mut opt = SparseAdam::all(&sa, SparseAdamConfig::default()).unwrap();
    opt.step_sparse(&mut sa, &[SparseGrad::new(emb, &[1], &[1.0, 2.0, 3.0])])
        .unwrap();
    opt.save_checkpoint(&spath, Some(&sa)).unwrap();
    let sold = std::fs::read(&spath).unwrap();
    opt.step_sparse(&mut sa, &[SparseGrad::new(emb, &[2], &[1.0, 2.0, 3.0])])
        .unwrap();
    assert!(checkpoint::sparse_adam::save_with(&FailingRename, &spath, &opt, Some(&sa)).is_err());
    assert_eq!(std::fs::read(&spath).unwrap(), sold);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["avg.safetensors", "spa.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// SparseAdam

/// An embedding table `emb` `[rows, cols]` and a vector `vec` `[5]`, registered in `order`
/// (0: emb, 1: vec), values by name.
fn table<T: Float>(rows: usize, cols: usize, order: &[usize]) -> (Arena<T>, Param<T>, Param<T>) {
    let mut b = ArenaBuilder::<T>::new();
    for &k in order {
        if k == 0 {
            b.param("emb", &[rows, cols], &Rng(3).vec::<T>(rows * cols, 1.0))
                .unwrap();
        } else {
            b.param("vec", &[5], &Rng(4).vec::<T>(5, 1.0)).unwrap();
        }
    }
    let a = b.build();
    let (e, v) = (a.find("emb").unwrap(), a.find("vec").unwrap());
    (a, e, v)
}

fn spa_observe<T: Float>(opt: &SparseAdam<T>, a: &Arena<T>) -> (String, Vec<u64>) {
    (opt.state_dict_json().unwrap(), bits(a.params()))
}

/// The optimizer's whole state by name: steps, both buffers, group options.
fn spa_by_name<T: Float>(opt: &SparseAdam<T>, a: &Arena<T>) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["emb", "vec"] {
        let p = a.find(name).unwrap();
        let (m, v) = opt.state(a, p).unwrap();
        out.push(format!(
            "{name}: step {:?} m {:?} v {:?} value {:?}",
            opt.step_count(p),
            bits(m),
            bits(v),
            bits(a.value(p))
        ));
    }
    for g in 0..opt.num_groups() {
        out.push(format!("{:?}", opt.group_config(g).unwrap()));
    }
    out
}

fn sparse_grads(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<usize>, Vec<f64>) {
    let r: Vec<usize> = (0..5)
        .map(|_| ((rng.next_f64() + 1.0) * rows as f64) as usize % rows)
        .collect();
    let v = rng.vec::<f64>(r.len() * cols, 1.0);
    (r, v)
}

fn spa_step<T: Float>(opt: &mut SparseAdam<T>, a: &mut Arena<T>, rng: &mut Rng, both: bool) {
    let (e, v) = (a.find("emb").unwrap(), a.find("vec").unwrap());
    let (r, x) = sparse_grads(rng, 40, 4);
    let x: Vec<T> = x.into_iter().map(T::from_f64).collect();
    let (r2, x2) = sparse_grads(rng, 5, 1);
    let x2: Vec<T> = x2.into_iter().map(T::from_f64).collect();
    let mut grads = vec![SparseGrad::new(e, &r, &x)];
    if both {
        grads.push(SparseGrad::new(v, &r2, &x2));
    }
    opt.step_sparse(a, &grads).unwrap();
}

/// Two groups: `emb` (lr 0.02, betas (0.8, 0.99)) and `vec` (defaults).
fn spa_groups<T: Float>(a: &Arena<T>) -> SparseAdam<T> {
    let cfg = SparseAdamConfig::default()
        .with_lr(0.02)
        .with_betas((0.8, 0.99));
    SparseAdam::new(
        a,
        [
            (vec![a.find("emb").unwrap()], cfg),
            (vec![a.find("vec").unwrap()], SparseAdamConfig::default()),
        ],
    )
    .unwrap()
}

#[test]
fn sparse_adam_round_trip_continues_bitwise_in_another_registration_order() {
    fn case<T: Float>() {
        let dir = scratch(&format!("spa-rt-{}", T::DTYPE));
        let path = dir.join("run.safetensors");
        let (mut a, ..) = table::<T>(40, 4, &[0, 1]);
        let mut opt = spa_groups(&a);
        let mut rng = Rng(11);
        spa_step(&mut opt, &mut a, &mut rng, false); // vec has no state yet
        spa_step(&mut opt, &mut a, &mut rng, false);
        let size = opt.save_checkpoint(&path, Some(&a)).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        // Another registration order, other values, default options: all restored by name.
        let (mut b, ..) = table::<T>(40, 4, &[1, 0]);
        b.params_mut().iter_mut().for_each(|x| *x = T::ONE);
        let mut o2 = SparseAdam::new(
            &b,
            [
                (vec![b.find("emb").unwrap()], SparseAdamConfig::default()),
                (vec![b.find("vec").unwrap()], SparseAdamConfig::default()),
            ],
        )
        .unwrap();
        o2.load_checkpoint(&path, Some(&mut b)).unwrap();
        assert_eq!(spa_by_name(&o2, &b), spa_by_name(&opt, &a));
        let (mut r1, mut r2) = (Rng(rng.0), Rng(rng.0));
        for _ in 0..3 {
            spa_step(&mut opt, &mut a, &mut r1, true);
            spa_step(&mut o2, &mut b, &mut r2, true);
        }
        assert_eq!(spa_by_name(&o2, &b), spa_by_name(&opt, &a));
        // State only: the arena is left alone; a file with values also loads without one.
        let (mut c, ..) = table::<T>(40, 4, &[0, 1]);
        let mut o3 = spa_groups(&c);
        let before = bits(c.params());
        o3.load_checkpoint(&path, None).unwrap();
        assert_eq!(bits(c.params()), before);
        opt.save_checkpoint(&path, None).unwrap();
        o3.load_checkpoint(&path, None).unwrap();
        c.params_mut().copy_from_slice(a.params());
        assert_eq!(spa_observe(&o3, &c), spa_observe(&opt, &a));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    case::<f32>();
    case::<f64>();
}

#[test]
fn sparse_adam_casts_between_f32_and_f64() {
    let (mut a, ..) = table::<f64>(40, 4, &[0, 1]);
    let mut opt = spa_groups(&a);
    let mut rng = Rng(12);
    for _ in 0..3 {
        spa_step(&mut opt, &mut a, &mut rng, true);
    }
    let mut bytes = Vec::new();
    checkpoint::sparse_adam::write(&mut bytes, &opt, Some(&a)).unwrap();
    let (mut b, ..) = table::<f32>(40, 4, &[1, 0]);
    let mut o32 = spa_groups(&b);
    checkpoint::sparse_adam::read(&mut &bytes[..], bytes.len() as u64, &mut o32, Some(&mut b))
        .unwrap();
    for name in ["emb", "vec"] {
        let (p64, p32) = (a.find(name).unwrap(), b.find(name).unwrap());
        let cast =
            |v: &[f64]| -> Vec<u64> { bits(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()) };
        let (m64, v64) = opt.state(&a, p64).unwrap();
        let (m32, v32) = o32.state(&b, p32).unwrap();
        assert_eq!(bits(m32), cast(m64), "{name}");
        assert_eq!(bits(v32), cast(v64), "{name}");
        assert_eq!(bits(b.value(p32)), cast(a.value(p64)), "{name}");
        assert_eq!(o32.step_count(p32), opt.step_count(p64));
    }
}

fn spa_setup() -> (Vec<u8>, Arena<f32>, SparseAdam<f32>) {
    let (mut a, ..) = table::<f32>(6, 2, &[0, 1]);
    let mut opt = spa_groups(&a);
    let e = a.find("emb").unwrap();
    let v = a.find("vec").unwrap();
    opt.step_sparse(
        &mut a,
        &[
            SparseGrad::new(e, &[1, 4], &[0.5, -1.0, 2.0, 0.25]),
            SparseGrad::new(v, &[3], &[1.5]),
        ],
    )
    .unwrap();
    let mut bytes = Vec::new();
    checkpoint::sparse_adam::write(&mut bytes, &opt, Some(&a)).unwrap();
    let (fresh_arena, ..) = table::<f32>(6, 2, &[0, 1]);
    let fresh = spa_groups(&fresh_arena);
    (bytes, fresh_arena, fresh)
}

fn spa_load_fails(bytes: &[u8], a: &mut Arena<f32>, opt: &mut SparseAdam<f32>) -> String {
    let before = spa_observe(opt, a);
    let e = checkpoint::sparse_adam::read(&mut &bytes[..], bytes.len() as u64, opt, Some(a))
        .expect_err("a bad checkpoint must not load");
    assert_eq!(spa_observe(opt, a), before, "changed after: {e}");
    e.to_string()
}

#[test]
fn sparse_adam_truncations_and_flipped_bytes_are_errors_that_change_nothing() {
    let (bytes, mut a, mut opt) = spa_setup();
    for len in 0..bytes.len() {
        let msg = spa_load_fails(&bytes[..len], &mut a, &mut opt);
        assert!(
            msg.contains("truncated") || msg.contains("too short"),
            "length {len}: {msg}"
        );
    }
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        spa_load_fails(&b, &mut a, &mut opt);
    }
    checkpoint::sparse_adam::read(&mut &bytes[..], bytes.len() as u64, &mut opt, Some(&mut a))
        .unwrap();
}

#[test]
fn sparse_adam_mismatches_and_forgeries_name_what_is_wrong() {
    let (bytes, mut a, mut opt) = spa_setup();
    let (meta, header, data) = split(&bytes);
    let same = forge(&meta, header.clone(), data.clone());
    let (mut pa, ..) = table::<f32>(6, 2, &[0, 1]);
    let mut probe = spa_groups(&pa);
    checkpoint::sparse_adam::read(&mut &same[..], same.len() as u64, &mut probe, Some(&mut pa))
        .unwrap();
    type Edit = Box<dyn Fn(&mut Json, &mut Table)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "saved by the Adam optimizer, this is SparseAdam",
            Box::new(|m, _| m["optimizer"] = "Adam".into()),
        ),
        (
            "Invalid learning rate: -1.0",
            Box::new(|m, _| m["param_groups"][0]["hyperparams"]["lr"] = (-1.0).into()),
        ),
        (
            "Invalid beta parameter at index 1: 1.0",
            Box::new(|m, _| {
                m["param_groups"][1]["hyperparams"]["betas"] = serde_json::json!([0.9, 1.0])
            }),
        ),
        (
            "it has 1 parameter groups, the optimizer has 2",
            Box::new(|m, _| {
                m["param_groups"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "group 0 has no parameter named `vec`",
            Box::new(|m, _| m["param_groups"][0]["params"][0]["name"] = "vec".into()),
        ),
        (
            "parameter `emb` has shape [12] in the saved state and `emb` has shape [6, 2]",
            Box::new(|m, _| m["param_groups"][0]["params"][0]["shape"] = serde_json::json!([12])),
        ),
        (
            "state for parameter number 7 which no group lists",
            Box::new(|m, _| m["state"][0]["index"] = 7.into()),
        ),
        (
            "parameter `emb` has no step count",
            Box::new(|m, _| {
                m["state"][0].as_object_mut().unwrap().remove("step");
            }),
        ),
        (
            "expected exp_avg, exp_avg_sq",
            Box::new(|m, _| m["state"][0]["buffers"] = serde_json::json!(["exp_avg"])),
        ),
        (
            "SparseAdam keeps none besides step",
            Box::new(|m, _| m["state"][0]["scalars"] = serde_json::json!({"mu_product": 1.0})),
        ),
        (
            "parameter `emb` has two saved states",
            Box::new(|m, _| {
                let s = m["state"][0].clone();
                m["state"].as_array_mut().unwrap().push(s);
            }),
        ),
        (
            "tensor `state.0.exp_avg` has shape [12]",
            Box::new(|_, h| h["state.0.exp_avg"]["shape"] = serde_json::json!([12])),
        ),
        (
            "the checkpoint does not store parameter `vec`",
            Box::new(|m, _| {
                m["params"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "holds no parameter values",
            Box::new(|m, _| {
                m.as_object_mut().unwrap().remove("params");
            }),
        ),
    ];
    for (want, edit) in cases {
        let (mut meta, mut header) = (meta.clone(), header.clone());
        edit(&mut meta, &mut header);
        let b = forge(&meta, header, data.clone());
        let msg = spa_load_fails(&b, &mut a, &mut opt);
        assert!(msg.contains(want), "want `{want}`, got `{msg}`");
    }
    // Groups that hold other parameters.
    let one = SparseAdam::all(&a, SparseAdamConfig::default()).unwrap();
    let mut one = one;
    let before = spa_observe(&one, &a);
    let e = checkpoint::sparse_adam::read(&mut &bytes[..], bytes.len() as u64, &mut one, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("it has 2 parameter groups, the optimizer has 1"),
        "{e}"
    );
    assert_eq!(spa_observe(&one, &a), before);
    // Another arena.
    let (mut other, ..) = table::<f32>(6, 2, &[0, 1]);
    let e = checkpoint::sparse_adam::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        Some(&mut other),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("built for another arena"), "{e}");
    let mut sink = Vec::new();
    assert!(checkpoint::sparse_adam::write(&mut sink, &opt, Some(&other)).is_err());
    // An averaged model's file.
    let mut m = AveragedModel::new(&a);
    m.update_parameters(&a).unwrap();
    let mut avg = Vec::new();
    checkpoint::averaged::write(&mut avg, &m).unwrap();
    assert!(spa_load_fails(&avg, &mut a, &mut opt)
        .contains("saved by the AveragedModel optimizer, this is SparseAdam"));
}

#[test]
fn a_state_saved_at_lr_zero_loads() {
    // A schedule that ends at 0 (cosine to eta_min = 0) leaves lr = 0 in the groups; torch
    // checks `0 < lr` only in the constructor, so such a state must save and load.
    let (mut a, ..) = table::<f64>(40, 4, &[0, 1]);
    let mut opt = spa_groups(&a);
    let mut rng = Rng(5);
    spa_step(&mut opt, &mut a, &mut rng, true);
    opt.set_lr(0, 0.0).unwrap();
    let mut bytes = Vec::new();
    checkpoint::sparse_adam::write(&mut bytes, &opt, None).unwrap();
    let mut o2 = spa_groups(&a);
    checkpoint::sparse_adam::read(&mut &bytes[..], bytes.len() as u64, &mut o2, None).unwrap();
    assert_eq!(o2.lr(0).unwrap(), 0.0);
    o2.load_state_dict_json(&opt.state_dict_json().unwrap())
        .unwrap();
    // Construction still refuses it, with torch's message.
    let e = SparseAdam::all(&a, SparseAdamConfig::default().with_lr(0.0)).unwrap_err();
    assert_eq!(e.to_string(), "Invalid learning rate: 0.0");
}

#[test]
fn an_n_averaged_beyond_int64_is_refused_at_save() {
    // A JSON state may carry any u64 (the counter saturates); torch's buffer is int64.
    let a = arena::<f32>(&[0, 1, 2, 3], 8);
    let mut m = AveragedModel::new(&a);
    m.update_parameters(&a).unwrap();
    let mut state = m.state_dict().unwrap();
    state.n_averaged = u64::MAX;
    m.load_state_dict(&state).unwrap();
    let mut out = Vec::new();
    let e = checkpoint::averaged::write(&mut out, &m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit torch's int64 buffer"), "{e}");
    assert!(out.is_empty());
    state.n_averaged = i64::MAX as u64;
    m.load_state_dict(&state).unwrap();
    checkpoint::averaged::write(&mut out, &m).unwrap();
    let mut m2 = AveragedModel::new(&a);
    checkpoint::averaged::read(&mut &out[..], out.len() as u64, &mut m2).unwrap();
    assert_eq!(m2.n_averaged(), i64::MAX as u64);
}
