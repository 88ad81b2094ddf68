//! Training metrics: one JSON object per line in `metrics.jsonl` (flushed as written), and the loss curve as SVG.

use std::io::Write;
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending (a resumed run continues the file).
    pub fn open(path: &Path) -> std::io::Result<MetricsLog> {
        Ok(MetricsLog { file: std::fs::OpenOptions::new().create(true).append(true).open(path)? })
    }

    pub fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let line = serde_json::to_string(r).expect("a record serializes");
        writeln!(self.file, "{line}")?;
        self.file.flush()
    }
}

/// Reads `metrics.jsonl` (lines that do not parse are skipped: a run killed mid-line leaves at most one).
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// The training loss (and eval loss, as points) against the step, as a standalone SVG document.
pub fn loss_svg(records: &[Record]) -> String {
    let train: Vec<(f64, f64)> = records.iter().filter_map(|r| r.loss.map(|l| (r.step as f64, l))).collect();
    let eval: Vec<(f64, f64)> = records.iter().filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l))).collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).filter(|p| p.1.is_finite()).collect();
    let (w, h, m) = (720.0, 420.0, 56.0);
    let (x0, x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if x0.is_finite() { (x0, if x1 > x0 { x1 } else { x0 + 1.0 }) } else { (0.0, 1.0) };
    let (y0, y1) = if y0.is_finite() { (y0, if y1 > y0 { y1 } else { y0 + 1.0 }) } else { (0.0, 1.0) };
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" \
         y2=\"{b}\" stroke=\"black\"/>\n",
        b = h - m,
        r = w - m
    );
    for k in 0..=4 {
        let (fx, fy) = (x0 + (x1 - x0) * k as f64 / 4.0, y0 + (y1 - y0) * k as f64 / 4.0);
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{fx:.0}</text>\n", sx(fx), h - m + 18.0);
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{fy:.3}</text>\n", m - 6.0, sy(fy) + 4.0);
    }
    s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">step</text>\n", w / 2.0, h - 12.0);
    s += &format!("<text x=\"{m}\" y=\"{:.1}\">loss (train: line, eval: dots)</text>\n", m - 16.0);
    if !train.is_empty() {
        let pts: Vec<String> = train.iter().map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1))).collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            pts.join(" ")
        );
    }
    for p in &eval {
        s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#d62728\"/>\n", sx(p.0), sy(p.1));
    }
    s + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_plot_has_both_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path).unwrap();
        let recs = vec![
            Record { step: 0, eval_loss: Some(3.0), ..Record::default() },
            Record {
                step: 1,
                loss: Some(2.5),
                lr: Some(1e-4),
                grad_norm: Some(0.5),
                tokens_per_s: Some(99.0),
                ..Default::default()
            },
            Record { step: 2, loss: Some(2.0), eval_loss: Some(2.2), ..Record::default() },
        ];
        for r in &recs {
            log.write(r).unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\": 3, \"lo").unwrap();
        assert_eq!(read(&path).unwrap(), recs, "a torn last line is skipped");
        let svg = loss_svg(&recs);
        assert!(svg.starts_with("<svg") && svg.contains("<polyline") && svg.matches("<circle").count() == 2);
    }
}
