//! SVG plots of a bench, drawn by the project itself with plotters: push latency percentile
//! curves per target, and GPS ingest (server CPU per point, points delivered) per offered rate.
//! Curves are thinned to a bounded number of points so the files stay a few tens of KiB.

use super::plan::{Kind, Target};
use super::results::{BenchResults, Metric, RunStatus};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Most points drawn per curve.
const MAX_POINTS: usize = 120;
/// Plot size, pixels.
const SIZE: (u32, u32) = (900, 500);

/// A target's colour, the same in every plot.
fn colour(t: Target) -> RGBColor {
    match t {
        Target::Gate => RGBColor(0xD6, 0x27, 0x28),
        Target::GateSecure => RGBColor(0x8C, 0x1A, 0x1B),
        Target::Mosquitto => RGBColor(0x1F, 0x77, 0xB4),
        Target::MosquittoTls => RGBColor(0x0E, 0x3F, 0x66),
        Target::Rumqttd => RGBColor(0xFF, 0x7F, 0x0E),
        Target::NatsServer => RGBColor(0x2C, 0xA0, 0x2C),
        Target::Ceiling => RGBColor(0x7F, 0x7F, 0x7F),
    }
}

/// (percentile in 0..1, value) pairs from HdrHistogram's percentile distribution text.
pub fn parse_hgrm(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let value: f64 = f.next()?.parse().ok()?;
            let pct: f64 = f.next()?.parse().ok()?;
            (0.0..=1.0).contains(&pct).then_some((pct, value))
        })
        .collect()
}

/// At most `max` points of `v`, first and last kept.
pub fn thin(v: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if v.len() <= max || max < 2 {
        return v.to_vec();
    }
    let step = (v.len() - 1) as f64 / (max - 1) as f64;
    (0..max).map(|i| v[((i as f64 * step).round() as usize).min(v.len() - 1)]).collect()
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;
/// One target's points: (offered k points/s, value, not quoted: loadgen-bound or late).
type Series = (Target, Vec<(f64, f64, bool)>);

/// Writes every plot the results allow into `dir` as `<stamp>-*.svg`; returns the files.
pub fn draw(b: &BenchResults, dir: &Path, stamp: &str) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let latency = dir.join(format!("{stamp}-push-latency.svg"));
    if push_latency(b, &latency).map_err(|e| format!("{}: {e}", latency.display()))? {
        files.push(latency);
    }
    let gps = dir.join(format!("{stamp}-gps.svg"));
    if gps_ingest(b, &gps).map_err(|e| format!("{}: {e}", gps.display()))? {
        files.push(gps);
    }
    Ok(files)
}

/// Latency (µs, log) against "1 in N" (log): the usual percentile plot. False if no data.
fn push_latency(b: &BenchResults, path: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    let curves: Vec<(Target, Vec<(f64, f64)>)> = b
        .runs
        .iter()
        .filter(|r| r.spec.kind == Kind::Push && r.status == RunStatus::Ok)
        .filter_map(|r| {
            let c = &r.push.as_ref()?.curve;
            // x = 1/(1-p), so 99 % is 100 and 99.9 % is 1000.
            let pts: Vec<(f64, f64)> =
                c.iter().filter(|(p, v)| *p < 1.0 && *v > 0.0).map(|(p, v)| (1.0 / (1.0 - p), *v)).collect();
            (!pts.is_empty()).then(|| (r.spec.target, thin(&pts, MAX_POINTS)))
        })
        .collect();
    if curves.is_empty() {
        return Ok(false);
    }
    let x_max = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)).fold(10.0f64, f64::max).min(1e6);
    let y_min = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).fold(f64::MAX, f64::min).max(1.0);
    let y_max = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).fold(1.0f64, f64::max);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let spec = &b.runs.iter().find(|r| r.spec.kind == Kind::Push).map(|r| r.spec.clone());
    let title = match spec {
        Some(s) => format!(
            "Push latency, app-server → driver (fan-out {}, {} drivers, GPS running)",
            s.fanout,
            loadgen::report::num(u64::from(s.conns))
        ),
        None => "Push latency".into(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..x_max * 1.2).log_scale(), (y_min * 0.8..y_max * 1.25).log_scale())?;
    chart
        .configure_mesh()
        .max_light_lines(1)
        .x_desc("percentile")
        .y_desc("latency, µs")
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 1.0 / x);
            if p < 99.0 {
                format!("{p:.0}%")
            } else {
                format!("{}%", trim(p))
            }
        })
        .y_label_formatter(&|y| trim(*y))
        .draw()?;
    for (t, c) in &curves {
        let col = colour(*t);
        chart
            .draw_series(LineSeries::new(c.iter().copied(), col.stroke_width(2)))?
            .label(t.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(true)
}

/// `12.0` → `12`, `99.9` → `99.9`, `1234.5` → `1234`.
fn trim(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.1}");
        s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
    }
}

/// Two panels over the offered rate of the GPS runs (the profile's GPS connections): server
/// CPU µs per point, and points/s delivered. False if no data.
fn gps_ingest(b: &BenchResults, path: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    // Each point: (offered k/s, value, not quoted); those not quoted are drawn hollow.
    let series = |f: fn(&super::results::RunResult) -> Option<f64>| -> Vec<Series> {
        Target::ALL
            .iter()
            .filter_map(|&t| {
                let mut pts: Vec<(f64, f64, bool)> = b
                    .runs
                    .iter()
                    .filter(|r| r.spec.kind == Kind::Gps && r.spec.target == t && r.status == RunStatus::Ok)
                    .filter_map(|r| Some((r.spec.offered_per_s / 1000.0, f(r)?, !r.quotable())))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (!pts.is_empty()).then_some((t, pts))
            })
            .collect()
    };
    let cpu = series(|r| Metric::GpsCpuUsPerPoint.of(r));
    let delivered = series(|r| Metric::GpsDeliveredPerS.of(r).map(|d| d / 1000.0));
    if cpu.is_empty() {
        return Ok(false);
    }
    let conns = b.runs.iter().find(|r| r.spec.kind == Kind::Gps).map_or(0, |r| r.spec.conns);
    let root = SVGBackend::new(path, (SIZE.0, SIZE.1 + 50)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "GPS ingest, one point per TCP segment, {} connections (hollow: loadgen-bound or late)",
            loadgen::report::num(u64::from(conns))
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((1, 2));
    let x_max = cpu.iter().flat_map(|(_, c)| c.iter().map(|p| p.0)).fold(1.0f64, f64::max) * 1.1;
    let draw_panel = |area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
                      data: &[Series],
                      y_desc: &str|
     -> PlotResult {
        let y_max = data.iter().flat_map(|(_, c)| c.iter().map(|p| p.1)).fold(1.0f64, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart.configure_mesh().max_light_lines(1).x_desc("offered, k points/s").y_desc(y_desc).draw()?;
        for (t, c) in data {
            let col = colour(*t);
            chart
                .draw_series(LineSeries::new(c.iter().map(|p| (p.0, p.1)), col.stroke_width(2)))?
                .label(t.name())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
            chart.draw_series(c.iter().map(|&(x, y, bound)| {
                let style = if bound { col.stroke_width(2) } else { col.filled() };
                Circle::new((x, y), 4, style)
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    };
    draw_panel(&panels[0], &cpu, Metric::GpsCpuUsPerPoint.name())?;
    draw_panel(&panels[1], &delivered, "delivered, k points/s")?;
    root.present()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_text_parses() {
        let text = "       Value     Percentile TotalCount 1/(1-Percentile)\n\n\
                    \x20    100.000 0.000000000000          1           1.00\n\
                    \x20    250.000 0.500000000000        500           2.00\n\
                    \x20    900.000 0.990000000000        990         100.00\n\
                    \x20   1000.000 1.000000000000       1000\n\
                    #[Mean    =      300.000, StdDeviation   =       10.000]\n";
        let v = parse_hgrm(text);
        assert_eq!(v, vec![(0.0, 100.0), (0.5, 250.0), (0.99, 900.0), (1.0, 1000.0)]);
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let v: Vec<(f64, f64)> = (0..1000).map(|i| (f64::from(i), 0.0)).collect();
        let t = thin(&v, 10);
        assert_eq!(t.len(), 10);
        assert_eq!((t[0].0, t[9].0), (0.0, 999.0));
        assert_eq!(thin(&v[..5], 10).len(), 5);
    }
}
