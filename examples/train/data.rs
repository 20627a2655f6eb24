//! The UCI handwritten digits (8×8 images, 10 classes, 1,797 samples), shipped gzipped in
//! `examples/data/digits.csv.gz` (see `examples/data/README.md` for source and licenses), and a
//! seeded train/test split.

use std::io::Read;

use rand::seq::SliceRandom;
use rand::Rng;

/// Pixels per image (8×8).
pub const FEATURES: usize = 64;
/// Digit classes.
pub const CLASSES: usize = 10;

/// The gzipped CSV: 64 pixel values 0..16 then the label, one image per line.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Images as rows of `FEATURES` floats (pixels scaled to 0..1) and their labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Row-major, `len() × FEATURES`.
    pub x: Vec<f32>,
    /// Class of each row, `0..CLASSES`.
    pub y: Vec<u8>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Row `i`'s pixels.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * FEATURES..(i + 1) * FEATURES]
    }

    fn select(&self, idx: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(idx.len() * FEATURES);
        for &i in idx {
            x.extend_from_slice(self.row(i));
        }
        Dataset {
            x,
            y: idx.iter().map(|&i| self.y[i]).collect(),
        }
    }
}

/// Decompresses and parses the shipped digits file; pixels are divided by 16.
pub fn load_digits() -> Result<Dataset, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| format!("digits.csv.gz: {e}"))?;
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != FEATURES + 1 {
            return Err(format!(
                "digits.csv.gz line {}: {} fields, expected {}",
                line_no + 1,
                fields.len(),
                FEATURES + 1
            ));
        }
        for f in &fields[..FEATURES] {
            let v: f32 = f
                .trim()
                .parse()
                .map_err(|e| format!("digits.csv.gz line {}: {e}", line_no + 1))?;
            x.push(v / 16.0);
        }
        let label: f32 = fields[FEATURES]
            .trim()
            .parse()
            .map_err(|e| format!("digits.csv.gz line {}: {e}", line_no + 1))?;
        if !(0.0..CLASSES as f32).contains(&label) || label.fract() != 0.0 {
            return Err(format!(
                "digits.csv.gz line {}: bad label {label}",
                line_no + 1
            ));
        }
        y.push(label as u8);
    }
    Ok(Dataset { x, y })
}

/// A stratified split: within each class, a seeded shuffle puts `test_fraction` of the samples
/// in the test set. Both sets keep the original order of the samples they hold.
pub fn split(data: &Dataset, test_fraction: f64, rng: &mut impl Rng) -> (Dataset, Dataset) {
    let mut train = Vec::new();
    let mut test = Vec::new();
    for class in 0..CLASSES as u8 {
        let mut idx: Vec<usize> = (0..data.len()).filter(|&i| data.y[i] == class).collect();
        idx.shuffle(rng);
        let n_test = (idx.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&idx[..n_test]);
        train.extend_from_slice(&idx[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    (data.select(&train), data.select(&test))
}
