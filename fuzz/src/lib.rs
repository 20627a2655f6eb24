//! The fuzz targets' bodies, shared by the cargo-fuzz binaries (`fuzz_targets/`) and by the
//! corpus replay test of the main crate (`tests/fuzz_corpus.rs`, which includes this file), so
//! CI replays every committed input on the stable toolchain without cargo-fuzz.
//!
//! Only optarena's public API and std are used here.
#![allow(clippy::type_complexity)]

use optarena::checkpoint;
use optarena::optim::*;
use optarena::{
    Algorithm, Arena, ArenaBuilder, Float, HyperValue, Hyperparams, KernelArgs, MatchBy, Optimizer,
    ParamGroup, ParamScalars,
};

/// Reads fuzz input as a stream of choices; past the end everything reads as zero.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// Over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    /// True when every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    /// Two bytes.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    /// Eight bytes.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.iter_mut().for_each(|x| *x = self.u8());
        u64::from_le_bytes(b)
    }
    /// A number below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.u8() as usize % n
    }
    /// A flag.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    /// The rest of the input.
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.data.get(self.pos..).unwrap_or(&[]);
        self.pos = self.data.len();
        r
    }
    /// A float: mostly interesting values, sometimes raw bits (NaN, infinities, subnormals).
    pub fn f64(&mut self) -> f64 {
        const SPECIAL: [f64; 24] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            0.9,
            0.99,
            0.999,
            1e-8,
            1e-3,
            0.1,
            2.0,
            10.0,
            1e6,
            1e30,
            -1e-3,
            3.5,
            1e-300,
            5e-324,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ];
        match self.u8() {
            b @ 0..=191 => SPECIAL[b as usize % SPECIAL.len()],
            192..=223 => (self.u16() as f64 - 32768.0) / 256.0,
            _ => f64::from_bits(self.u64()),
        }
    }
    /// A float for data (parameters, gradients, state): small values mostly.
    pub fn data<T: Float>(&mut self) -> T {
        match self.u8() {
            b @ 0..=200 => T::from_f64((b as f64 - 100.0) / 37.0),
            201..=247 => T::from_f64(self.f64()),
            _ => T::from_f64(f64::from_bits(self.u64())),
        }
    }
}

/// Bitwise equality, with every NaN equal to every NaN.
pub fn same<T: Float>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let (x, y) = (x.to_f64(), y.to_f64());
            (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits()
        })
}

/// Algorithms the generic targets choose from (`Optimizer<T, A>`); L-BFGS, a type of its own,
/// is number [`ALGORITHMS`] in the targets that cover it.
pub const ALGORITHMS: usize = 13;

/// Runs `$body` with `A` bound to the algorithm numbered `$k` (of [`ALGORITHMS`]) and `T` to
/// f32 or f64.
macro_rules! dispatch {
    ($k:expr, $f64:expr, $func:ident ( $($arg:expr),* )) => {
        match ($k % ALGORITHMS, $f64) {
            (0, false) => $func::<f32, SGDAlgorithm>($($arg),*),
            (1, false) => $func::<f32, AdamAlgorithm>($($arg),*),
            (2, false) => $func::<f32, AdamWAlgorithm>($($arg),*),
            (3, false) => $func::<f32, RAdamAlgorithm>($($arg),*),
            (4, false) => $func::<f32, NAdamAlgorithm>($($arg),*),
            (5, false) => $func::<f32, AdamaxAlgorithm>($($arg),*),
            (6, false) => $func::<f32, AdagradAlgorithm>($($arg),*),
            (7, false) => $func::<f32, AdadeltaAlgorithm>($($arg),*),
            (8, false) => $func::<f32, RMSpropAlgorithm>($($arg),*),
            (9, false) => $func::<f32, RpropAlgorithm>($($arg),*),
            (10, false) => $func::<f32, ASGDAlgorithm>($($arg),*),
            (11, false) => $func::<f32, AdafactorAlgorithm>($($arg),*),
            (11, true) => $func::<f64, AdafactorAlgorithm>($($arg),*),
            (12, false) => $func::<f32, MuonAlgorithm>($($arg),*),
            (12, true) => $func::<f64, MuonAlgorithm>($($arg),*),
            (0, true) => $func::<f64, SGDAlgorithm>($($arg),*),
            (1, true) => $func::<f64, AdamAlgorithm>($($arg),*),
            (2, true) => $func::<f64, AdamWAlgorithm>($($arg),*),
            (3, true) => $func::<f64, RAdamAlgorithm>($($arg),*),
            (4, true) => $func::<f64, NAdamAlgorithm>($($arg),*),
            (5, true) => $func::<f64, AdamaxAlgorithm>($($arg),*),
            (6, true) => $func::<f64, AdagradAlgorithm>($($arg),*),
            (7, true) => $func::<f64, AdadeltaAlgorithm>($($arg),*),
            (8, true) => $func::<f64, RMSpropAlgorithm>($($arg),*),
            (9, true) => $func::<f64, RpropAlgorithm>($($arg),*),
            _ => $func::<f64, ASGDAlgorithm>($($arg),*),
        }
    };
}

/// Targets 1 and 3: the first byte picks one of the [`ALGORITHMS`] generic algorithms or
/// L-BFGS (number [`ALGORITHMS`]), the second f32 or f64, and the rest goes to `$generic::<T,
/// A>` or `$lbfgs::<T>`.
macro_rules! dispatch_with_lbfgs {
    ($data:expr, $generic:ident, $lbfgs:ident) => {{
        let mut input = Input::new($data);
        let k = input.u8() as usize % (ALGORITHMS + 1);
        let wide = input.bool();
        match (k == ALGORITHMS, wide) {
            (true, true) => $lbfgs::<f64>(&mut input),
            (true, false) => $lbfgs::<f32>(&mut input),
            (false, _) => dispatch!(k, wide, $generic(&mut input)),
        }
    }};
}

/// A value of the same kind as `like`, from the input.
fn hyper_like(input: &mut Input<'_>, like: &HyperValue) -> HyperValue {
    match like {
        HyperValue::Bool(_) => HyperValue::Bool(input.bool()),
        HyperValue::Number(_) => HyperValue::Number(input.f64()),
        HyperValue::Pair(..) | HyperValue::OptPair(..) => {
            HyperValue::Pair(input.f64(), input.f64())
        }
        HyperValue::Triple(..) => HyperValue::Triple(input.f64(), input.f64(), input.f64()),
        HyperValue::None => HyperValue::Number(input.f64()),
        HyperValue::Str(s) => HyperValue::Str(s.clone()),
    }
}

/// A config with some hyperparameters set from the input (maybe invalid).
fn config_from<C: Hyperparams>(input: &mut Input<'_>) -> C {
    let mut c = C::default();
    for &name in C::NAMES {
        if input.u8().is_multiple_of(3) {
            let v = hyper_like(input, &c.get(name).expect("listed"));
            let _ = c.set(name, &v);
        }
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Target 2: kernels

/// Each fused SIMD kernel against its scalar reference, on arbitrary lengths, offsets (so
/// unaligned slices), hyperparameters, step counts, scalars, gradient scales and data: bitwise
/// equal, NaN equal to NaN.
pub fn kernels(data: &[u8]) {
    let mut input = Input::new(data);
    let k = input.u8() as usize;
    let wide = input.bool();
    dispatch!(k, wide, kernel_case(&mut input));
}

fn kernel_case<T: Float, A: Algorithm>(input: &mut Input<'_>) {
    let config: A::Config = config_from(input);
    if config.validate().is_err() {
        return;
    }
    let step = match input.u8() {
        0..=200 => 1 + input.u8() as u64,
        _ => 1 + input.u64() % (1 << 40),
    };
    let n_scalars = <A::Scalars as ParamScalars>::NAMES.len();
    let mut scalars = if input.bool() {
        A::init_scalars(&config)
    } else {
        let v: Vec<f64> = (0..n_scalars).map(|_| input.f64()).collect();
        A::Scalars::from_values(&v)
    };
    let coeffs = A::prepare(&config, step, &mut scalars);
    let args = KernelArgs {
        coeffs,
        fresh: input.bool(),
        grad_scale: if input.bool() { 1.0 } else { input.f64() },
        simd: optarena::SimdLevel::Best,
    };
    if A::PER_PARAMETER {
        return per_parameter_kernel_case::<T, A>(input, &config, step, &args);
    }
    let len = input.below(70) + if input.bool() { 0 } else { input.u8() as usize };
    let offset = input.below(9);
    let n_buf = A::buffers(&config).len();
    let mut params: Vec<T> = (0..offset + len).map(|_| input.data()).collect();
    let grads: Vec<T> = (0..offset + len).map(|_| input.data()).collect();
    let mut bufs: Vec<Vec<T>> = (0..n_buf)
        .map(|_| (0..offset + len).map(|_| input.data()).collect())
        .collect();
    let mut params2 = params.clone();
    let mut bufs2 = bufs.clone();
    {
        let mut views: Vec<&mut [T]> = bufs.iter_mut().map(|b| &mut b[offset..]).collect();
        A::fused(&args, &mut params[offset..], &grads[offset..], &mut views);
        let mut views: Vec<&mut [T]> = bufs2.iter_mut().map(|b| &mut b[offset..]).collect();
        A::reference(&args, &mut params2[offset..], &grads[offset..], &mut views);
    }
    assert!(
        same(&params, &params2),
        "{} {}: fused and reference params differ (config {config:?}, step {step}, args {args:?})\n\
         fused     {params:?}\nreference {params2:?}\ngrads {grads:?}",
        A::NAME,
        T::DTYPE
    );
    for (k, (a, b)) in bufs.iter().zip(&bufs2).enumerate() {
        assert!(
            same(a, b),
            "{} {}: fused and reference buffer {k} differ (config {config:?}, step {step}, \
             args {args:?})\nfused     {a:?}\nreference {b:?}",
            A::NAME,
            T::DTYPE
        );
    }
}

/// Target 2 for an algorithm that updates a whole parameter of a given shape at once
/// (Adafactor): a random shape of rank 0 to 3, arbitrary values in the parameter, gradient,
/// buffers and shaped state, and the fused and reference kernels must agree bit for bit.
fn per_parameter_kernel_case<T: Float, A: Algorithm>(
    input: &mut Input<'_>,
    config: &A::Config,
    step: u64,
    args: &KernelArgs<A::Coeffs>,
) {
    let rank = input.below(4);
    let mut shape: Vec<usize> = (0..rank)
        .map(|_| {
            let max = if input.bool() { 9 } else { 80 };
            input.below(max)
        })
        .collect();
    if A::check_param(&shape).is_err() {
        // A shape the algorithm refuses (Muon's non-matrices): a matrix instead.
        shape = vec![input.below(40), input.below(40)];
        if A::check_param(&shape).is_err() {
            return;
        }
    }
    let n: usize = shape.iter().product();
    if n > 1 << 14 {
        return;
    }
    let mut params: Vec<T> = (0..n).map(|_| input.data()).collect();
    let grads: Vec<T> = (0..n).map(|_| input.data()).collect();
    let mut bufs: Vec<Vec<T>> = (0..A::buffers(config).len())
        .map(|_| (0..n).map(|_| input.data()).collect())
        .collect();
    let mut aux: Vec<Vec<T>> = (0..A::aux_buffers(&shape).len())
        .map(|k| (0..A::aux_len(&shape, k)).map(|_| input.data()).collect())
        .collect();
    let (mut params2, mut bufs2, mut aux2) = (params.clone(), bufs.clone(), aux.clone());
    {
        let mut b: Vec<&mut [T]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        let mut x: Vec<&mut [T]> = aux.iter_mut().map(|b| &mut b[..]).collect();
        A::fused_param(args, &shape, &mut params, &grads, &mut b, &mut x);
        let mut b: Vec<&mut [T]> = bufs2.iter_mut().map(|b| &mut b[..]).collect();
        let mut x: Vec<&mut [T]> = aux2.iter_mut().map(|b| &mut b[..]).collect();
        A::reference_param(args, &shape, &mut params2, &grads, &mut b, &mut x);
    }
    let what = || {
        format!(
            "{} {} shape {shape:?} config {config:?} step {step} args {args:?}",
            A::NAME,
            T::DTYPE
        )
    };
    assert!(
        same(&params, &params2),
        "{}: params differ\nfused     {params:?}\nreference {params2:?}",
        what()
    );
    for (a, b) in bufs.iter().zip(&bufs2).chain(aux.iter().zip(&aux2)) {
        assert!(
            same(a, b),
            "{}: state differs\nfused     {a:?}\nreference {b:?}",
            what()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The standard model of targets 1 and 3

/// Shapes of the standard model: five parameters.
pub const SHAPES: [&[usize]; 5] = [&[3, 2], &[2], &[4], &[1], &[2, 2]];

/// Shapes of the standard model of an algorithm that takes matrices only (Muon): five
/// parameters again, wide, tall, a row, a column and a square.
pub const MATRIX_SHAPES: [&[usize]; 5] = [&[3, 2], &[2, 4], &[1, 3], &[4, 1], &[2, 2]];

/// The standard model's shapes for algorithm `A`: [`SHAPES`], or [`MATRIX_SHAPES`] when `A`
/// refuses one of them ([`Algorithm::check_param`]).
pub fn shapes_for<A: Algorithm>() -> &'static [&'static [usize]; 5] {
    if SHAPES.iter().all(|s| A::check_param(s).is_ok()) {
        &SHAPES
    } else {
        &MATRIX_SHAPES
    }
}

/// The standard model with deterministic values.
pub fn standard_arena<T: Float>() -> Arena<T> {
    arena_of(&SHAPES)
}

/// The standard model of algorithm `A` (see [`shapes_for`]).
pub fn standard_arena_for<T: Float, A: Algorithm>() -> Arena<T> {
    arena_of(shapes_for::<A>())
}

fn arena_of<T: Float>(shapes: &[&[usize]]) -> Arena<T> {
    let mut b = ArenaBuilder::<T>::new();
    for (i, s) in shapes.iter().enumerate() {
        b.param_with(&format!("p{i}"), s, |j| {
            T::from_f64((i * 7 + j) as f64 * 0.125 - 1.0)
        })
        .expect("fresh names");
    }
    b.build()
}

/// The standard optimizer: groups p0..p2 and p2..p5 (the second with a smaller lr when the
/// algorithm has one).
pub fn standard_optimizer<T: Float, A: Algorithm>(arena: &Arena<T>) -> Optimizer<T, A> {
    let h: Vec<_> = arena.handles().collect();
    let mut g2 = ParamGroup::new(h[2..].iter().copied());
    if <A::Config as Hyperparams>::NAMES.contains(&"lr") {
        g2 = g2.with("lr", 0.005);
    }
    Optimizer::new(
        arena,
        [ParamGroup::new(h[..2].iter().copied()), g2],
        A::Config::default(),
    )
    .expect("a valid standard optimizer")
}

/// Writes gradients for step `t` into every parameter.
pub fn standard_grads<T: Float>(arena: &mut Arena<T>, t: u64) {
    for (i, p) in arena.handles().collect::<Vec<_>>().into_iter().enumerate() {
        let g = arena.grad_mut(p);
        for (j, x) in g.iter_mut().enumerate() {
            *x = T::from_f64(((t as usize * 31 + i * 7 + j * 3) % 17) as f64 / 8.0 - 1.0);
        }
    }
}

/// Everything observable: the state dict as JSON and the arena's values, bitwise.
fn observe<T: Float, A: Algorithm>(opt: &Optimizer<T, A>, arena: &Arena<T>) -> (String, Vec<u64>) {
    snapshot(opt.state_dict_json(), arena)
}

/// A state dict's JSON (or why it has none) beside the arena's values, bitwise.
fn snapshot<T: Float>(json: optarena::Result<String>, arena: &Arena<T>) -> (String, Vec<u64>) {
    (
        json.unwrap_or_else(|e| format!("unserialisable: {e}")),
        arena
            .params()
            .iter()
            .map(|x| x.to_f64().to_bits())
            .collect(),
    )
}

/// Recomputes both checksums of something shaped like a checkpoint, so mutations reach the
/// code behind the checksum checks.
pub fn fix_checksums(bytes: &mut [u8]) {
    if bytes.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let Some(end) = usize::try_from(n).ok().and_then(|n| n.checked_add(8)) else {
        return;
    };
    if end.checked_add(8).is_none_or(|e| e > bytes.len()) {
        return;
    }
    let h = crc32fast::hash(&bytes[..end]);
    let d = crc32fast::hash(&bytes[end + 8..]);
    bytes[end..end + 4].copy_from_slice(&h.to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&d.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Target 1: decoding

/// Checkpoint (binary) and state-dict (JSON) decoding from arbitrary bytes into the standard
/// optimizer of some kind: never a panic; on an error nothing changed; what loads saves and
/// loads again to the same state.
pub fn decode(data: &[u8]) {
    if let Some(rest) = data.strip_prefix(SWALR_TAG) {
        return swalr_decode(rest);
    }
    if let Some(rest) = data.strip_prefix(AVERAGED_TAG) {
        return averaged_decode(rest);
    }
    if let Some(rest) = data.strip_prefix(AVERAGED_BIN_TAG) {
        return averaged_bin_decode(rest);
    }
    if let Some(rest) = data.strip_prefix(SPARSE_ADAM_BIN_TAG) {
        return sparse_adam_bin_decode(rest);
    }
    if let Some(rest) = data.strip_prefix(TRAINING_TAG) {
        return training_decode(rest);
    }
    dispatch_with_lbfgs!(data, decode_case, lbfgs_decode_case);
}

fn decode_case<T: Float, A: Algorithm>(input: &mut Input<'_>) {
    let mode = input.u8();
    let by = if input.bool() {
        MatchBy::Name
    } else {
        MatchBy::Position
    };
    let with_arena = input.bool();
    let mut arena = standard_arena_for::<T, A>();
    let mut opt = standard_optimizer::<T, A>(&arena);
    if input.bool() {
        standard_grads(&mut arena, 1);
        opt.step(&mut arena).expect("a valid step");
    }
    let before = observe(&opt, &arena);
    let mut bytes = input.rest().to_vec();
    let result = match mode % 4 {
        // Binary, with the checksums made right so the fuzzer gets past them.
        0 | 1 => {
            if mode.is_multiple_of(4) {
                fix_checksums(&mut bytes);
            }
            let _ = checkpoint::inspect_reader(&mut &bytes[..], bytes.len() as u64);
            let target = if with_arena { Some(&mut arena) } else { None };
            checkpoint::read(&mut &bytes[..], bytes.len() as u64, &mut opt, target, by).map(|_| ())
        }
        // JSON.
        _ => match std::str::from_utf8(&bytes) {
            Ok(text) => opt.load_state_dict_json(text, by),
            Err(_) => return,
        },
    };
    match result {
        Err(_) => assert_eq!(observe(&opt, &arena), before, "changed by a failed load"),
        Ok(()) => round_trip(&mut opt, &mut arena),
    }
}

/// What is loaded saves (binary and JSON) and loads back to the same state.
fn round_trip<T: Float, A: Algorithm>(opt: &mut Optimizer<T, A>, arena: &mut Arena<T>) {
    let now = observe(opt, arena);
    let mut bytes = Vec::new();
    checkpoint::write(&mut bytes, opt, Some(arena)).expect("a loaded state saves");
    checkpoint::read(
        &mut &bytes[..],
        bytes.len() as u64,
        opt,
        Some(arena),
        MatchBy::Position,
    )
    .expect("a saved checkpoint loads back");
    assert_eq!(
        observe(opt, arena),
        now,
        "binary round trip changed the state"
    );
    let json = opt.state_dict_json().expect("a loaded state serialises");
    opt.load_state_dict_json(&json, MatchBy::Position)
        .expect("a saved state dict loads back");
    assert_eq!(
        observe(opt, arena),
        now,
        "JSON round trip changed the state"
    );
}

// ---------------------------------------------------------------------------------------------
// Target 3: sequences of API calls

/// Arbitrary sequences of calls (create, add group, write grads, step, zero_grad, save, load,
/// change hyperparameters) against what must hold: no panic, an error for each call known to
/// be invalid, and nothing changed by a call that errs.
pub fn api(data: &[u8]) {
    if let Some(rest) = data.strip_prefix(SPARSE_ADAM_TAG) {
        return sparse_adam_api(rest);
    }
    dispatch_with_lbfgs!(data, api_case, lbfgs_api_case);
}

/// A group spec from the input: a set of parameter positions (maybe empty, overlapping
/// another group's, or interleaved with it: any layout is valid) and some overrides (maybe
/// invalid).
fn group_from<T: Float, A: Algorithm>(
    input: &mut Input<'_>,
    arena: &Arena<T>,
) -> (ParamGroup<T>, Vec<usize>, bool) {
    let a = input.below(SHAPES.len() + 1);
    let b = input.below(SHAPES.len() + 1);
    let (lo, hi) = (a.min(b), a.max(b));
    let h: Vec<_> = arena.handles().collect();
    let mode = input.u8();
    let (mut g, set) = if mode.is_multiple_of(4) && hi > lo {
        (
            ParamGroup::named((lo..hi).map(|i| format!("p{i}"))),
            (lo..hi).collect(),
        )
    } else if mode % 8 == 1 {
        // Any subset, in a shuffled order: gaps between the group's parameters.
        let mask = input.u8();
        let mut set: Vec<usize> = (0..h.len()).filter(|i| mask & (1 << i) != 0).collect();
        let rot = input.below(set.len().max(1));
        let mut listed = set.clone();
        listed.rotate_left(rot);
        let g = if mask & 0x80 != 0 {
            ParamGroup::named(listed.iter().map(|i| format!("p{i}")))
        } else {
            ParamGroup::new(listed.iter().map(|&i| h[i]))
        };
        set.sort_unstable();
        (g, set)
    } else {
        (
            ParamGroup::new(h[lo..hi].iter().copied()),
            (lo..hi).collect(),
        )
    };
    let mut bogus = false;
    let c = A::Config::default();
    for _ in 0..input.below(3) {
        let names = <A::Config as Hyperparams>::NAMES;
        if input.u8().is_multiple_of(8) {
            g = g.with("no_such_hyperparameter", 1.0);
            bogus = true;
        } else {
            let name = names[input.below(names.len())];
            g = g.with(name, hyper_like(input, &c.get(name).expect("listed")));
        }
    }
    (g, set, bogus)
}

fn api_case<T: Float, A: Algorithm>(input: &mut Input<'_>) {
    let mut arena = standard_arena_for::<T, A>();
    let mut other = standard_arena_for::<T, A>();
    let mut opt: Option<Optimizer<T, A>> = None;
    // Parameter positions of the groups, to know which additions must fail.
    let mut ranges: Vec<Vec<usize>> = Vec::new();
    let mut saved: Vec<(bool, Vec<u8>, (String, Vec<u64>))> = Vec::new();
    let mut t = 0u64;
    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        let op = input.u8() % 12;
        let Some(o) = opt.as_mut() else {
            // Create.
            let (g, r, bogus) = group_from::<T, A>(input, &arena);
            let defaults: A::Config = config_from(input);
            if let Ok(o) = Optimizer::<T, A>::new(&arena, [g], defaults.clone()) {
                assert!(
                    !r.is_empty() && !bogus && defaults.validate().is_ok(),
                    "created with {r:?}, bogus {bogus}, defaults {defaults:?}"
                );
                opt = Some(o);
                ranges = vec![r];
            }
            continue;
        };
        let before = observe(o, &arena);
        let groups_before = o.num_groups();
        let result: optarena::Result<()> = match op {
            0 => {
                // Add a group.
                let (g, r, bogus) = group_from::<T, A>(input, &arena);
                let overlap = ranges.iter().any(|q| q.iter().any(|i| r.contains(i)));
                let res = o.add_param_group(&arena, g);
                if r.is_empty() || overlap || bogus {
                    assert!(res.is_err(), "invalid group {r:?} accepted");
                }
                if res.is_ok() {
                    assert_eq!(o.num_groups(), groups_before + 1);
                    // The group's runs are exactly the maximal runs of its set.
                    let runs = o.group_params(groups_before).expect("just added");
                    let covered: Vec<usize> = runs.iter().flat_map(|q| q.clone()).collect();
                    assert_eq!(covered, r, "runs {runs:?} of {r:?}");
                    assert!(runs.windows(2).all(|w| w[0].end < w[1].start), "{runs:?}");
                    ranges.push(r);
                }
                res
            }
            1 => {
                // Write gradients (sometimes non-finite), or clear one.
                let h: Vec<_> = arena.handles().collect();
                let p = h[input.below(h.len())];
                if input.u8().is_multiple_of(4) {
                    arena.clear_grad(p);
                } else {
                    let vals: Vec<T> = (0..arena.info(p).len).map(|_| input.data()).collect();
                    arena.set_grad(p, &vals).expect("right length");
                }
                continue;
            }
            2 => {
                t += 1;
                standard_grads(&mut arena, t);
                let res = o.step(&mut arena);
                assert!(
                    res.is_ok(),
                    "a plain step with valid settings failed: {res:?}"
                );
                continue;
            }
            3 => match input.u8() % 4 {
                0 => o
                    .step_with_options(
                        &mut arena,
                        optarena::StepOptions::new().skipping_non_finite(),
                    )
                    .map(|_| ()),
                1 => o
                    .step_with_options(
                        &mut arena,
                        optarena::StepOptions::new().clipped(optarena::ClipNorm::l2(input.f64())),
                    )
                    .map(|_| ()),
                2 => {
                    let k = input.below(3);
                    let res = optarena::StepOptions::new()
                        .accumulated(k)
                        .and_then(|options| o.step_with_options(&mut arena, options))
                        .map(|_| ());
                    if k == 0 {
                        assert!(res.is_err(), "accumulated(0) accepted");
                    }
                    res
                }
                _ => o.step(&mut other).map(|_| ()),
            },
            4 => {
                let r = o.zero_grad(&mut arena, input.bool());
                assert!(r.is_ok());
                continue;
            }
            5 | 6 => {
                // Save (binary or JSON) and check it loads back into the same optimizer.
                let binary = op == 5;
                let bytes = if binary {
                    let mut b = Vec::new();
                    checkpoint::write(&mut b, o, Some(&arena)).expect("saving works");
                    b
                } else {
                    o.state_dict_json().expect("serialising works").into_bytes()
                };
                round_trip(o, &mut arena);
                saved.push((binary, bytes, before.clone()));
                continue;
            }
            7 | 8 => {
                // Load a saved snapshot, maybe corrupted, maybe from another layout.
                if saved.is_empty() {
                    continue;
                }
                let (binary, mut bytes, snap) = saved[input.below(saved.len())].clone();
                let corrupt = input.u8().is_multiple_of(3) && !bytes.is_empty();
                if corrupt {
                    let i = input.u16() as usize % bytes.len();
                    bytes[i] ^= 1 << input.below(8);
                }
                let by = if input.bool() {
                    MatchBy::Name
                } else {
                    MatchBy::Position
                };
                let res = if binary {
                    checkpoint::read(&mut &bytes[..], bytes.len() as u64, o, Some(&mut arena), by)
                        .map(|_| ())
                } else {
                    match std::str::from_utf8(&bytes) {
                        Ok(s) => o.load_state_dict_json(s, by),
                        Err(_) => continue,
                    }
                };
                if corrupt && binary {
                    assert!(res.is_err(), "a corrupted checkpoint loaded");
                }
                if res.is_ok() && !corrupt && binary {
                    assert_eq!(
                        observe(o, &arena),
                        snap,
                        "a checkpoint loaded to another state"
                    );
                }
                res
            }
            9 => {
                // Set a hyperparameter: maybe a bad group, an unknown name, a bad value.
                let names = <A::Config as Hyperparams>::NAMES;
                let g = input.below(o.num_groups() + 1);
                let unknown = input.u8().is_multiple_of(8);
                let name = if unknown {
                    "nope"
                } else {
                    names[input.below(names.len())]
                };
                let like = A::Config::default().get(names[0]).expect("listed");
                let value = if unknown {
                    like
                } else {
                    hyper_like(input, &A::Config::default().get(name).expect("listed"))
                };
                let res = o.set_hyper(g, name, value.clone());
                if g >= groups_before || unknown {
                    assert!(res.is_err(), "set_hyper({g}, {name}) accepted");
                }
                if name == "lr" && matches!(value, HyperValue::Number(x) if x.is_nan()) {
                    assert!(res.is_err(), "NaN lr accepted");
                }
                res
            }
            10 => {
                // Replace a group's config wholesale.
                let g = input.below(o.num_groups() + 1);
                let c: A::Config = config_from(input);
                let valid = c.validate().is_ok();
                let res = o.set_group_config(g, c);
                if g >= groups_before || !valid {
                    assert!(res.is_err(), "set_group_config({g}) accepted");
                }
                res
            }
            _ => {
                // A fresh optimizer replaces this one (new group layout).
                opt = None;
                ranges.clear();
                continue;
            }
        };
        if result.is_err() {
            assert_eq!(
                observe(o, &arena),
                before,
                "op {op} failed but changed the state"
            );
            assert_eq!(o.num_groups(), groups_before);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// L-BFGS in targets 1 and 3: its own type, with closures

/// Everything observable of an L-BFGS run: its state dict as JSON and the arena's values.
fn lbfgs_observe<T: Float>(opt: &LBFGS<T>, arena: &Arena<T>) -> (String, Vec<u64>) {
    snapshot(opt.state_dict_json(), arena)
}

/// `f(p) = Σ cᵢ·(pᵢ − a)²` with `cᵢ` cycling through `coeffs`: writes the gradient, returns f.
pub fn quadratic<T: Float>(arena: &mut Arena<T>, coeffs: &[T], a: T) -> T {
    let (p, g) = arena.params_and_grads_mut();
    let mut f = T::ZERO;
    for (i, (g, &p)) in g.iter_mut().zip(p).enumerate() {
        let c = coeffs[i % coeffs.len()];
        let d = p - a;
        f = f + c * d * d;
        *g = T::from_f64(2.0) * c * d;
    }
    f
}

/// An L-BFGS over the standard arena with a config from the input, or `None` if the config
/// is refused (which it must be exactly when it does not validate).
fn lbfgs_from<T: Float>(input: &mut Input<'_>, arena: &Arena<T>) -> Option<LBFGS<T>> {
    let mut config: LBFGSConfig = config_from(input);
    // A step may run `max_iter` iterations and `max_eval` closure calls, as in torch; the
    // fuzzer found 48-byte inputs asking for billions (minutes per input). Cap them so each
    // input stays fast; every other value is kept.
    config.max_iter = config.max_iter.min(40);
    config.max_eval = config.max_eval.map(|e| e.min(50));
    let res = LBFGS::new(arena, [ParamGroup::all()], config.clone());
    assert_eq!(
        res.is_ok(),
        config.validate().is_ok(),
        "construction and validation disagree on {config:?}"
    );
    res.ok()
}

fn lbfgs_decode_case<T: Float>(input: &mut Input<'_>) {
    let by = if input.bool() {
        MatchBy::Name
    } else {
        MatchBy::Position
    };
    let mut arena = standard_arena::<T>();
    let Some(mut opt) = lbfgs_from::<T>(input, &arena) else {
        return;
    };
    let coeffs = [T::ONE, T::from_f64(0.5)];
    for _ in 0..input.below(3) {
        opt.step(&mut arena, |a| quadratic(a, &coeffs, T::ONE))
            .expect("a valid step");
    }
    let before = lbfgs_observe(&opt, &arena);
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    match opt.load_state_dict_json(text, by) {
        Err(_) => assert_eq!(
            lbfgs_observe(&opt, &arena),
            before,
            "changed by a failed load"
        ),
        Ok(()) => {
            let now = lbfgs_observe(&opt, &arena);
            let json = opt.state_dict_json().expect("a loaded state serialises");
            opt.load_state_dict_json(&json, MatchBy::Position)
                .expect("a saved state dict loads back");
            assert_eq!(
                lbfgs_observe(&opt, &arena),
                now,
                "JSON round trip changed it"
            );
        }
    }
}

/// Target 3 for L-BFGS: steps on a quadratic with arbitrary (maybe non-finite) curvature,
/// failing closures, a wrong arena, saves and (maybe corrupted) loads, hyperparameter
/// changes. No panic; a call that errs changes nothing, except that a failed closure leaves
/// the gradients as it wrote them (documented), which `lbfgs_observe` does not look at.
fn lbfgs_api_case<T: Float>(input: &mut Input<'_>) {
    let mut arena = standard_arena::<T>();
    let mut other = standard_arena::<T>();
    let Some(mut opt) = lbfgs_from::<T>(input, &arena) else {
        return;
    };
    let mut saved: Vec<String> = Vec::new();
    let mut ops = 0;
    while !input.is_empty() && ops < 32 {
        ops += 1;
        let op = input.u8() % 8;
        let before = lbfgs_observe(&opt, &arena);
        let result: optarena::Result<()> = match op {
            0 | 1 => {
                let coeffs: Vec<T> = (0..1 + input.below(3)).map(|_| input.data()).collect();
                let a = input.data();
                opt.step(&mut arena, |ar| quadratic(ar, &coeffs, a))
                    .map(|_| ())
            }
            2 => {
                // A closure that fails on call k: the step errs and nothing changes.
                let k = input.below(4);
                let coeffs = [T::ONE, T::from_f64(2.0)];
                let mut calls = 0;
                let res = opt.try_step(&mut arena, |ar| {
                    calls += 1;
                    if calls > k {
                        Err("injected closure failure")
                    } else {
                        Ok(quadratic(ar, &coeffs, T::ZERO))
                    }
                });
                if calls > k {
                    assert!(res.is_err(), "a failing closure's step succeeded");
                }
                res.map(|_| ())
            }
            3 => {
                let res = opt.step(&mut other, |_| T::ZERO).map(|_| ());
                assert!(res.is_err(), "a step on another arena succeeded");
                res
            }
            4 => {
                let json = opt.state_dict_json().expect("serialising works");
                saved.push(json);
                continue;
            }
            5 => {
                let Some(mut json) = saved.get(input.below(saved.len().max(1))).cloned() else {
                    continue;
                };
                if input.bool() && !json.is_empty() {
                    let i = input.u16() as usize % json.len();
                    if json.is_char_boundary(i) && json.is_char_boundary(i + 1) {
                        json.replace_range(
                            i..i + 1,
                            ["0", "}", ",", "\"", "-", "e"][input.below(6)],
                        );
                    }
                }
                let by = if input.bool() {
                    MatchBy::Name
                } else {
                    MatchBy::Position
                };
                opt.load_state_dict_json(&json, by)
            }
            6 => {
                let names = <LBFGSConfig as Hyperparams>::NAMES;
                let name = names[input.below(names.len())];
                let like = LBFGSConfig::default().get(name).expect("listed");
                let value = hyper_like(input, &like);
                opt.set_hyper(name, value)
            }
            _ => {
                let r = opt.zero_grad(&mut arena, input.bool());
                assert!(r.is_ok());
                continue;
            }
        };
        if result.is_err() {
            assert_eq!(
                lbfgs_observe(&opt, &arena),
                before,
                "L-BFGS op {op} failed but changed the state"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stochastic Weight Averaging and SparseAdam, behind tags at the start of the input (so the
// numbering of the generic targets above, and their corpus, are unchanged)

/// `decode` input starting with this: the rest is a `SWALR` state dict as JSON.
pub const SWALR_TAG: &[u8] = b"SWALR:";

/// A `SWALR` state from arbitrary bytes: never a panic; a failed load changes neither the
/// scheduler nor the optimizer; what loads saves and loads back to the same state and steps.
fn swalr_decode(data: &[u8]) {
    use optarena::schedule::{SWALRConfig, SWALR};
    use optarena::LrScheduler;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let arena = standard_arena::<f64>();
    let mut opt = standard_optimizer::<f64, SGDAlgorithm>(&arena);
    let mut s = SWALR::new(&mut opt, SWALRConfig::new(0.05)).expect("a valid SWALR");
    let lrs = |o: &Optimizer<f64, SGDAlgorithm>| -> Vec<u64> {
        (0..o.num_groups())
            .map(|g| o.lr(g).unwrap().to_bits())
            .collect()
    };
    let before = (s.state_dict_json().unwrap(), lrs(&opt));
    match s.load_state_dict_json(&mut opt, text) {
        Err(_) => assert_eq!(
            (s.state_dict_json().unwrap(), lrs(&opt)),
            before,
            "changed by a failed load"
        ),
        Ok(()) => {
            let saved = s.state_dict_json().expect("a loaded state serialises");
            let now = lrs(&opt);
            s.load_state_dict_json(&mut opt, &saved)
                .expect("a saved state loads back");
            assert_eq!((s.state_dict_json().unwrap(), lrs(&opt)), (saved, now));
            for _ in 0..3 {
                let _ = s.step(&mut opt);
            }
        }
    }
}

/// `decode` input starting with this: one byte (bit 0: f64; bit 1: EMA; bit 2: update before
/// loading), then an `AveragedModel` state as JSON.
pub const AVERAGED_TAG: &[u8] = b"AVG:";

fn averaged_decode(data: &[u8]) {
    let mut input = Input::new(data);
    if input.bool() {
        averaged_decode_case::<f64>(&mut input)
    } else {
        averaged_decode_case::<f32>(&mut input)
    }
}

/// An `AveragedModel` state from arbitrary bytes: never a panic; a failed load changes
/// nothing; what loads saves, loads back to the same state, and updates.
fn averaged_decode_case<T: Float>(input: &mut Input<'_>) {
    use optarena::AveragedModel;
    let flags = input.u8();
    let arena = standard_arena::<T>();
    let mut m = if flags & 1 == 1 {
        AveragedModel::ema(&arena, 0.9).expect("a valid decay")
    } else {
        AveragedModel::new(&arena)
    };
    if flags & 2 == 2 {
        m.update_parameters(&arena).expect("the same arena");
    }
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let observe = |m: &AveragedModel<T>| {
        (
            m.state_dict_json().unwrap(),
            m.averaged()
                .iter()
                .map(|x| x.to_f64().to_bits())
                .collect::<Vec<_>>(),
        )
    };
    let before = observe(&m);
    match m.load_state_dict_json(text) {
        Err(_) => assert_eq!(observe(&m), before, "changed by a failed load"),
        Ok(()) => {
            let now = observe(&m);
            m.load_state_dict_json(&now.0)
                .expect("a saved state loads back");
            assert_eq!(observe(&m), now, "JSON round trip changed the state");
            m.update_parameters(&arena).expect("the same arena");
        }
    }
}

/// `api` input starting with this: a `SparseAdam` call sequence (see [`sparse_adam_api`]).
pub const SPARSE_ADAM_TAG: &[u8] = b"SPA:";

fn sparse_adam_api(data: &[u8]) {
    let mut input = Input::new(data);
    if input.bool() {
        sparse_adam_case::<f64>(&mut input)
    } else {
        sparse_adam_case::<f32>(&mut input)
    }
}

/// `SparseAdam` on the standard arena with options from the input (maybe invalid), then
/// operations: sparse steps with arbitrary handles (of this arena or another), row indices
/// (often out of range, repeated) and value counts (often wrong); dense steps; saves and
/// (maybe corrupted) loads. Never a panic; every call that errs changes nothing, and every
/// call known to be invalid errs.
fn sparse_adam_case<T: Float>(input: &mut Input<'_>) {
    use optarena::{SparseAdam, SparseAdamConfig, SparseGrad};
    let mut arena = standard_arena::<T>();
    let other = standard_arena::<T>();
    let config = SparseAdamConfig::default()
        .with_lr(if input.bool() { input.f64() } else { 1e-2 })
        .with_betas(if input.bool() {
            (input.f64(), input.f64())
        } else {
            (0.9, 0.999)
        })
        .with_eps(if input.bool() { input.f64() } else { 1e-8 })
        .with_maximize(input.bool());
    let handles: Vec<_> = arena.handles().collect();
    let split = input.below(handles.len());
    let groups = vec![
        (handles[..split].to_vec(), config),
        (handles[split..].to_vec(), SparseAdamConfig::default()),
    ];
    let Ok(mut opt) = SparseAdam::new(&arena, groups) else {
        return;
    };
    let observe = |opt: &SparseAdam<T>, arena: &Arena<T>| {
        (
            // `Error` is not `PartialEq` (it keeps `io::Error` sources): compare messages.
            opt.state_dict_json().map_err(|e| e.to_string()),
            arena
                .params()
                .iter()
                .map(|x| x.to_f64().to_bits())
                .collect::<Vec<_>>(),
        )
    };
    let mut saved = opt.state_dict_json().expect("serialises");
    let mut saved_bin: Vec<u8> = Vec::new();
    for _ in 0..32 {
        if input.is_empty() {
            break;
        }
        let before = observe(&opt, &arena);
        let (result, must_fail) = match input.u8() % 6 {
            0 | 1 => {
                let n = input.below(3);
                let mut rows: Vec<Vec<usize>> = Vec::new();
                let mut vals: Vec<Vec<T>> = Vec::new();
                let mut params = Vec::new();
                let mut invalid = false;
                let mut seen = Vec::new();
                for _ in 0..n {
                    let foreign = input.u8() == 255;
                    let k = input.below(SHAPES.len());
                    let p = if foreign {
                        other.handles().nth(k).expect("same layout")
                    } else {
                        handles[k]
                    };
                    let shape = SHAPES[k];
                    let cols = shape[1..].iter().product::<usize>();
                    let r: Vec<usize> = (0..input.below(5))
                        .map(|_| match input.u8() {
                            255 => usize::MAX,
                            b => b as usize % (shape[0] + 1),
                        })
                        .collect();
                    let len = match input.u8() {
                        250..=255 => input.below(9),
                        _ => r.len() * cols,
                    };
                    invalid |= foreign
                        || r.iter().any(|&x| x >= shape[0])
                        || len != r.len() * cols
                        || seen.contains(&k);
                    seen.push(k);
                    params.push(p);
                    vals.push((0..len).map(|_| input.data::<T>()).collect());
                    rows.push(r);
                }
                let grads: Vec<SparseGrad<'_, T>> = params
                    .iter()
                    .zip(&rows)
                    .zip(&vals)
                    .map(|((&p, r), v)| SparseGrad::new(p, r, v))
                    .collect();
                (opt.step_sparse(&mut arena, &grads), invalid)
            }
            2 => {
                let dense = input.bool();
                if dense {
                    standard_grads(&mut arena, 1);
                } else {
                    arena.zero_grad(true);
                }
                let r = opt.step(&mut arena);
                arena.zero_grad(true);
                (r, dense)
            }
            // Binary checkpoints: save (maybe with the arena, maybe another arena's), or load
            // the last save with a few bytes changed (checksums made right, sometimes).
            4 => {
                let with_arena = input.bool();
                if input.bool() {
                    let target = if input.u8() == 255 { &other } else { &arena };
                    saved_bin.clear();
                    let r = optarena::checkpoint::sparse_adam::write(
                        &mut saved_bin,
                        &opt,
                        with_arena.then_some(target),
                    );
                    if r.is_err() {
                        saved_bin.clear();
                    }
                    (r.map(|_| ()), with_arena && std::ptr::eq(target, &other))
                } else {
                    let mut bytes = saved_bin.clone();
                    for _ in 0..input.below(3) {
                        if !bytes.is_empty() {
                            let at = input.below(bytes.len());
                            bytes[at] = input.u8();
                        }
                    }
                    if input.bool() {
                        fix_checksums(&mut bytes);
                    }
                    let r = optarena::checkpoint::sparse_adam::read(
                        &mut &bytes[..],
                        bytes.len() as u64,
                        &mut opt,
                        with_arena.then_some(&mut arena),
                    );
                    (r.map(|_| ()), false)
                }
            }
            // Hyperparameters by name (what LR schedulers use), maybe invalid.
            5 => {
                use optarena::GroupHyperparams;
                let g = input.below(3);
                let (name, value) = match input.u8() % 5 {
                    0 => ("lr", HyperValue::Number(input.f64())),
                    1 => ("betas", HyperValue::Pair(input.f64(), input.f64())),
                    2 => ("eps", HyperValue::Number(input.f64())),
                    3 => ("maximize", HyperValue::Bool(input.bool())),
                    _ => ("momentum", HyperValue::Number(input.f64())),
                };
                let invalid = g >= opt.num_groups()
                    || name == "momentum"
                    || match &value {
                        HyperValue::Number(x) if name == "lr" => !(x.is_finite() && *x >= 0.0),
                        HyperValue::Number(x) => !(x.is_finite() && *x > 0.0),
                        HyperValue::Pair(a, b) => {
                            !((0.0..1.0).contains(a) && (0.0..1.0).contains(b))
                        }
                        _ => false,
                    };
                (opt.set_group_hyper(g, name, value), invalid)
            }
            _ => {
                if input.bool() {
                    saved = opt.state_dict_json().expect("serialises");
                    (Ok(()), false)
                } else {
                    let mut bytes = saved.clone().into_bytes();
                    let flips = input.below(3);
                    for _ in 0..flips {
                        if !bytes.is_empty() {
                            let at = input.below(bytes.len());
                            bytes[at] = input.u8();
                        }
                    }
                    match String::from_utf8(bytes) {
                        Ok(text) => (opt.load_state_dict_json(&text), false),
                        Err(_) => continue,
                    }
                }
            }
        };
        match result {
            Err(_) => assert_eq!(observe(&opt, &arena), before, "changed by a failed call"),
            Ok(()) => assert!(!must_fail, "an invalid call succeeded"),
        }
    }
}

/// `decode` input starting with this: one flags byte (bit 0: f64; bit 1: EMA; bit 2: update
/// before loading; bit 3: make the checksums right; bit 4: the model's arena registers its
/// parameters in reverse order), then an `AveragedModel` binary checkpoint.
pub const AVERAGED_BIN_TAG: &[u8] = b"AVGBIN:";

fn averaged_bin_decode(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    if flags & 1 == 1 {
        averaged_bin_case::<f64>(flags, input.rest())
    } else {
        averaged_bin_case::<f32>(flags, input.rest())
    }
}

/// The standard arena's shapes, registered in reverse order (names kept).
pub fn reversed_arena<T: Float>() -> Arena<T> {
    let a = standard_arena::<T>();
    let mut b = ArenaBuilder::<T>::new();
    let handles: Vec<_> = a.handles().collect();
    for (&p, info) in handles.iter().zip(a.infos()).rev() {
        b.param(&info.name, &info.shape, a.value(p))
            .expect("a valid parameter");
    }
    b.build()
}

/// An `AveragedModel` binary checkpoint from arbitrary bytes: never a panic; a failed load
/// changes nothing; what loads saves and loads back to the same state, and updates.
fn averaged_bin_case<T: Float>(flags: u8, bytes: &[u8]) {
    use optarena::AveragedModel;
    let arena = if flags & 16 == 16 {
        reversed_arena::<T>()
    } else {
        standard_arena::<T>()
    };
    let mut m = if flags & 2 == 2 {
        AveragedModel::ema(&arena, 0.9).expect("a valid decay")
    } else {
        AveragedModel::new(&arena)
    };
    if flags & 4 == 4 {
        m.update_parameters(&arena).expect("the same arena");
    }
    let mut bytes = bytes.to_vec();
    if flags & 8 == 8 {
        fix_checksums(&mut bytes);
    }
    let observe = |m: &AveragedModel<T>| {
        (
            format!("{:?}", m.avg_fn()),
            m.n_averaged(),
            m.averaged()
                .iter()
                .map(|x| x.to_f64().to_bits())
                .collect::<Vec<_>>(),
        )
    };
    let before = observe(&m);
    let _ = checkpoint::inspect_reader(&mut &bytes[..], bytes.len() as u64);
    match checkpoint::averaged::read(&mut &bytes[..], bytes.len() as u64, &mut m) {
        Err(_) => assert_eq!(observe(&m), before, "changed by a failed load"),
        Ok(_) => {
            let now = observe(&m);
            let mut out = Vec::new();
            checkpoint::averaged::write(&mut out, &m).expect("a loaded state saves");
            checkpoint::averaged::read(&mut &out[..], out.len() as u64, &mut m)
                .expect("a saved checkpoint loads back");
            assert_eq!(observe(&m), now, "binary round trip changed the state");
            m.update_parameters(&arena).expect("the same arena");
        }
    }
}

/// `decode` input starting with this: one flags byte (bit 0: f64; bit 1: load the arena's
/// values too; bit 2: step before loading; bit 3: make the checksums right; bit 4: the arena
/// registers its parameters in reverse order), then a `SparseAdam` binary checkpoint. The
/// optimizer has two groups: the standard arena's first two parameters (lr 0.01) and the rest.
pub const SPARSE_ADAM_BIN_TAG: &[u8] = b"SPABIN:";

fn sparse_adam_bin_decode(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    if flags & 1 == 1 {
        sparse_adam_bin_case::<f64>(flags, input.rest())
    } else {
        sparse_adam_bin_case::<f32>(flags, input.rest())
    }
}

/// The two-group `SparseAdam` of [`SPARSE_ADAM_BIN_TAG`] on `arena` (groups by name, so the
/// reversed arena gets the same groups).
pub fn standard_sparse_adam<T: Float>(arena: &Arena<T>) -> optarena::SparseAdam<T> {
    use optarena::{SparseAdam, SparseAdamConfig};
    let names: Vec<String> = standard_arena::<T>()
        .infos()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    let handles = |ns: &[String]| -> Vec<_> {
        ns.iter()
            .map(|n| arena.find(n).expect("the same names"))
            .collect()
    };
    SparseAdam::new(
        arena,
        [
            (
                handles(&names[..2]),
                SparseAdamConfig::default().with_lr(0.01),
            ),
            (handles(&names[2..]), SparseAdamConfig::default()),
        ],
    )
    .expect("a valid SparseAdam")
}

/// One sparse step on every parameter: rows 0 and the last, values from a counter.
pub fn standard_sparse_step<T: Float>(opt: &mut optarena::SparseAdam<T>, arena: &mut Arena<T>) {
    use optarena::SparseGrad;
    let infos = arena.infos().to_vec();
    let rows: Vec<Vec<usize>> = infos
        .iter()
        .map(|i| {
            let mut r = vec![0, i.shape[0] - 1];
            r.dedup();
            r
        })
        .collect();
    let vals: Vec<Vec<T>> = infos
        .iter()
        .zip(&rows)
        .map(|(i, r)| {
            (0..r.len() * (i.len / i.shape[0]))
                .map(|k| T::from_f64(k as f64 * 0.25 - 0.5))
                .collect()
        })
        .collect();
    let grads: Vec<SparseGrad<'_, T>> = arena
        .handles()
        .zip(&rows)
        .zip(&vals)
        .map(|((p, r), v)| SparseGrad::new(p, r, v))
        .collect();
    opt.step_sparse(arena, &grads).expect("a valid sparse step");
}

/// A `SparseAdam` binary checkpoint from arbitrary bytes: never a panic; a failed load changes
/// neither the optimizer nor the arena; what loads saves and loads back to the same state.
fn sparse_adam_bin_case<T: Float>(flags: u8, bytes: &[u8]) {
    let mut arena = if flags & 16 == 16 {
        reversed_arena::<T>()
    } else {
        standard_arena::<T>()
    };
    let mut opt = standard_sparse_adam(&arena);
    if flags & 4 == 4 {
        standard_sparse_step(&mut opt, &mut arena);
    }
    let with_arena = flags & 2 == 2;
    let mut bytes = bytes.to_vec();
    if flags & 8 == 8 {
        fix_checksums(&mut bytes);
    }
    let observe =
        |opt: &optarena::SparseAdam<T>, arena: &Arena<T>| snapshot(opt.state_dict_json(), arena);
    let before = observe(&opt, &arena);
    let r = checkpoint::sparse_adam::read(
        &mut &bytes[..],
        bytes.len() as u64,
        &mut opt,
        with_arena.then_some(&mut arena),
    );
    match r {
        Err(_) => assert_eq!(observe(&opt, &arena), before, "changed by a failed load"),
        Ok(_) => {
            let now = observe(&opt, &arena);
            let mut out = Vec::new();
            checkpoint::sparse_adam::write(&mut out, &opt, Some(&arena))
                .expect("a loaded state saves");
            checkpoint::sparse_adam::read(
                &mut &out[..],
                out.len() as u64,
                &mut opt,
                Some(&mut arena),
            )
            .expect("a saved checkpoint loads back");
            assert_eq!(
                observe(&opt, &arena),
                now,
                "binary round trip changed the state"
            );
            let json = opt.state_dict_json().expect("serialises");
            opt.load_state_dict_json(&json)
                .expect("a loaded state's JSON loads back");
            assert_eq!(
                observe(&opt, &arena),
                now,
                "JSON round trip changed the state"
            );
        }
    }
}

/// `decode` input starting with this: one byte (bit 0: make the checksums right; bit 1: train
/// a step before loading), then a training checkpoint (`checkpoint::TrainingRestore`) loaded
/// into the standard training state ([`standard_training`]).
pub const TRAINING_TAG: &[u8] = b"TRAIN:";

/// The standard training state: the standard arena (f32), the standard AdamW, a StepLR on it,
/// a GradScaler.
pub fn standard_training() -> (
    Arena<f32>,
    AdamW<f32>,
    optarena::schedule::StepLR,
    optarena::GradScaler,
) {
    use optarena::schedule::{StepLR, StepLRConfig};
    let arena = standard_arena::<f32>();
    let mut opt = standard_optimizer::<f32, AdamWAlgorithm>(&arena);
    let sched = StepLR::new(&mut opt, StepLRConfig::new(2)).expect("a valid StepLR");
    (arena, opt, sched, optarena::GradScaler::default())
}

/// Trains the standard training state one step.
pub fn standard_training_step(
    arena: &mut Arena<f32>,
    opt: &mut AdamW<f32>,
    sched: &mut optarena::schedule::StepLR,
    scaler: &mut optarena::GradScaler,
    t: u64,
) {
    use optarena::LrScheduler;
    standard_grads(arena, t);
    scaler.step(opt, arena).expect("a valid step");
    scaler.update();
    sched.step(opt).expect("a valid scheduler step");
}

fn training_decode(data: &[u8]) {
    use optarena::checkpoint::training::inspect_training_reader;
    use optarena::checkpoint::{TrainingCheckpoint, TrainingRestore};
    use optarena::LrScheduler;
    let mut input = Input::new(data);
    let flags = input.u8();
    let (mut arena, mut opt, mut sched, mut scaler) = standard_training();
    if flags & 2 != 0 {
        standard_training_step(&mut arena, &mut opt, &mut sched, &mut scaler, 1);
    }
    let observe_all = |arena: &Arena<f32>,
                       opt: &AdamW<f32>,
                       sched: &optarena::schedule::StepLR,
                       scaler: &optarena::GradScaler| {
        (
            observe(opt, arena),
            sched
                .state_dict_json()
                .expect("a scheduler state serialises"),
            format!("{scaler:?}"),
        )
    };
    let before = observe_all(&arena, &opt, &sched, &scaler);
    let mut bytes = input.rest().to_vec();
    if flags & 1 != 0 {
        fix_checksums(&mut bytes);
    }
    let _ = inspect_training_reader(&mut &bytes[..], bytes.len() as u64);
    let result = TrainingRestore::new(&mut arena)
        .optimizer("adamw", &mut opt)
        .scheduler("lr", &mut sched)
        .scaler(&mut scaler)
        .read(&mut &bytes[..], bytes.len() as u64);
    match result {
        Err(_) => assert_eq!(
            observe_all(&arena, &opt, &sched, &scaler),
            before,
            "changed by a failed load"
        ),
        Ok(loaded) => {
            // What loads saves and loads back to the same state.
            let now = observe_all(&arena, &opt, &sched, &scaler);
            let mut saved = Vec::new();
            let mut c = TrainingCheckpoint::new(&arena)
                .optimizer("adamw", &opt)
                .scheduler("lr", &sched)
                .scaler(&scaler)
                .step(loaded.step);
            for (k, v) in &loaded.metadata {
                c = c.metadata(k, v.clone());
            }
            c.write(&mut saved).expect("a loaded training state saves");
            let again = TrainingRestore::new(&mut arena)
                .optimizer("adamw", &mut opt)
                .scheduler("lr", &mut sched)
                .scaler(&mut scaler)
                .read(&mut &saved[..], saved.len() as u64)
                .expect("a saved training state loads back");
            assert_eq!(again.step, loaded.step);
            assert_eq!(again.metadata, loaded.metadata);
            assert_eq!(observe_all(&arena, &opt, &sched, &scaler), now);
        }
    }
}
