//! The results table, the per-epoch curves as CSV, and the plot (SVG).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::optimizers::Precision;
use crate::runner::{EpochStats, RunResult, Settings};

/// The f32 run `r` is a precision variant of (same optimizer, model and schedule), if `r` is
/// one and that run is in `results`.
fn f32_twin<'a>(r: &RunResult, results: &'a [RunResult]) -> Option<&'a RunResult> {
    if r.spec.precision == Precision::F32 {
        return None;
    }
    results.iter().find(|t| {
        t.spec.precision == Precision::F32
            && t.spec.opt.describe() == r.spec.opt.describe()
            && t.spec.arch == r.spec.arch
    })
}

/// Writes `results.md`, `history.csv` and `training.svg` into `out`, prints the table, and
/// returns the paths written.
pub fn write_all(
    out: &Path,
    settings: &Settings,
    results: &[RunResult],
) -> Result<Vec<PathBuf>, String> {
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let table = table(results);
    println!("\n{table}");

    let results_path = out.join("results.md");
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Digits: optimizer comparison\n\n{} epochs, batch {}, seed {}, MLP hidden {:?}.\n",
        settings.epochs, settings.batch_size, settings.seed, settings.hidden
    );
    md.push_str(&table);
    md.push('\n');
    for r in results {
        let _ = writeln!(
            md,
            "- {}: {} in {}, {} params, {}, schedule {}, clip {}{}",
            r.spec.label,
            r.spec.opt.describe(),
            r.spec.precision.describe(),
            r.num_params,
            match r.spec.batching {
                crate::runner::Batching::MiniBatch => "mini-batches".to_string(),
                crate::runner::Batching::FullBatch { steps } => match r.evaluations {
                    Some((evals, iters)) => format!(
                        "full batch, {steps} step(closure) per epoch ({iters} iterations, \
                         {evals} loss/gradient evaluations in all; its µs/step is per \
                         step(closure), evaluations excluded)"
                    ),
                    None => format!("full batch, {steps} steps per epoch"),
                },
            },
            r.spec.schedule.describe(),
            r.spec
                .clip
                .map(|c| format!("L2 norm {}", c.max_norm))
                .unwrap_or_else(|| "none".into()),
            if r.spec.l2 > 0.0 {
                format!(
                    ", L2 penalty λ/2·‖W‖² on the weights, λ = {:.3e}",
                    r.spec.l2
                )
            } else {
                String::new()
            },
        );
    }
    fs::write(&results_path, md).map_err(|e| format!("{}: {e}", results_path.display()))?;

    let csv_path = out.join("history.csv");
    let mut csv = String::from("run,epoch,lr,batch_loss,train_loss,train_acc,test_loss,test_acc\n");
    for r in results {
        for h in &r.history {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{}",
                r.spec.id,
                h.epoch,
                h.lr,
                h.batch_loss.map(|v| v.to_string()).unwrap_or_default(),
                h.train_loss,
                h.train_acc,
                h.test_loss,
                h.test_acc
            );
        }
    }
    fs::write(&csv_path, csv).map_err(|e| format!("{}: {e}", csv_path.display()))?;

    let plot_path = out.join("training.svg");
    plot(&plot_path, results).map_err(|e| format!("{}: {e}", plot_path.display()))?;
    Ok(vec![results_path, csv_path, plot_path])
}

/// The results as a Markdown table: final losses and accuracies (a precision variant's test
/// accuracy also as the difference to its f32 twin, in points), wall time, optimizer time.
pub fn table(results: &[RunResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| run                    | params | train loss | train acc | test loss | test acc | vs f32 | wall s | opt µs/step |"
    );
    let _ = writeln!(
        s,
        "|------------------------|-------:|-----------:|----------:|----------:|---------:|-------:|-------:|------------:|"
    );
    for r in results {
        let Some(h) = r.history.last() else { continue };
        let us = if r.timing.opt_steps > 0 {
            r.timing.opt_ns as f64 / r.timing.opt_steps as f64 / 1e3
        } else {
            0.0
        };
        let vs = f32_twin(r, results)
            .and_then(|t| t.history.last())
            .map(|t| format!("{:+.2}", 100.0 * (h.test_acc - t.test_acc)))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {:<22} | {:>6} | {:>10.4} | {:>8.2}% | {:>9.4} | {:>7.2}% | {:>6} | {:>6.2} | {:>11.1} |",
            r.spec.label,
            r.num_params,
            h.train_loss,
            100.0 * h.train_acc,
            h.test_loss,
            100.0 * h.test_acc,
            vs,
            r.timing.wall_s,
            us
        );
    }
    s
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Reads one number of an epoch's stats.
type Metric = fn(&EpochStats) -> f64;

/// Run `i`'s line: its own color and a thick line, or for a precision variant its f32 twin's
/// color and a thin line, so each mode sits next to f32.
fn line_style(i: usize, results: &[RunResult]) -> ShapeStyle {
    match f32_twin(&results[i], results) {
        Some(t) => {
            let j = results
                .iter()
                .position(|x| std::ptr::eq(x, t))
                .expect("a twin is in the results");
            COLORS[j % COLORS.len()].stroke_width(1)
        }
        None => COLORS[i % COLORS.len()].stroke_width(2),
    }
}

/// Three panels: train loss, test loss (log scale) and test accuracy, per run, against epochs.
fn plot(path: &Path, results: &[RunResult]) -> PlotResult {
    let root = SVGBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(40);
    title.draw(&Text::new(
        "Handwritten digits (UCI, 8x8): one MLP initialisation under four optimizers \
         (warmup + cosine, clip 1.0), AdamW also in bf16 modes 2 and 3 (thin lines), and \
         logistic regression by L-BFGS",
        (20, 12),
        ("sans-serif", 20).into_font(),
    ))?;
    let panels = body.split_evenly((1, 3));
    let epochs = results
        .iter()
        .filter_map(|r| r.history.last().map(|h| h.epoch))
        .max()
        .unwrap_or(1)
        .max(2) as f64;

    let loss_range = |f: Metric| {
        let vals = results.iter().flat_map(|r| r.history.iter().map(f));
        let (lo, hi) = vals.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let lo = if lo.is_finite() && lo > 0.0 { lo } else { 1e-3 };
        (lo * 0.8, hi.max(lo) * 1.25)
    };
    let panel_specs: [(&str, &str, Metric); 2] = [
        ("train loss (cross-entropy)", "train loss", |h| h.train_loss),
        ("test loss (cross-entropy)", "test loss", |h| h.test_loss),
    ];
    for (panel, (caption, ylabel, f)) in panels.iter().zip(panel_specs) {
        let (lo, hi) = loss_range(f);
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..epochs, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(ylabel)
            .y_labels(12)
            .y_label_formatter(&|v| format!("{v:.3}"))
            .draw()?;
        for (i, r) in results.iter().enumerate() {
            let style = line_style(i, results);
            chart
                .draw_series(LineSeries::new(
                    r.history.iter().map(|h| (h.epoch as f64, f(h))),
                    style,
                ))?
                .label(r.spec.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }

    // The axis starts near the lowest accuracy after the first tenth of training, so the
    // differences at the end stay visible; earlier points below it leave the panel.
    let settle = (epochs / 10.0).ceil() as usize;
    let acc_lo = results
        .iter()
        .flat_map(|r| r.history.iter().filter(|h| h.epoch >= settle.max(1)))
        .map(|h| h.test_acc * 100.0)
        .fold(100.0f64, f64::min);
    let acc_lo = ((acc_lo - 1.0) / 5.0).floor().clamp(0.0, 19.0) * 5.0;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("test accuracy", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..epochs, acc_lo..100.0)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("test accuracy (%)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, r) in results.iter().enumerate() {
        let style = line_style(i, results);
        let points: Vec<(f64, f64)> = r
            .history
            .iter()
            .map(|h| (h.epoch as f64, h.test_acc * 100.0))
            .collect();
        for (k, segment) in clip_below(&points, acc_lo).into_iter().enumerate() {
            let series = chart.draw_series(LineSeries::new(segment, style))?;
            if k == 0 {
                series
                    .label(r.spec.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The parts of a polyline at or above `lo`, cut where it crosses `lo` (plotters would draw
/// points below the axis on its edge).
fn clip_below(points: &[(f64, f64)], lo: f64) -> Vec<Vec<(f64, f64)>> {
    let mut segments = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for (k, &(x, y)) in points.iter().enumerate() {
        let prev = k.checked_sub(1).map(|j| points[j]);
        let crossing = |(x0, y0): (f64, f64)| (x0 + (x - x0) * (lo - y0) / (y - y0), lo);
        match (prev, y >= lo) {
            (Some(p), true) if p.1 < lo => current.push(crossing(p)),
            (Some(p), false) if p.1 >= lo => {
                current.push(crossing(p));
                segments.push(std::mem::take(&mut current));
            }
            _ => {}
        }
        if y >= lo {
            current.push((x, y));
        }
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}
