//! `report.html`: the ledger as a table plus bar charts of error and bits per tensor, in inline
//! SVG so the page works with no network.

use std::fmt::Write;

use super::report::Report;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One horizontal bar chart: a row per tensor, bar length proportional to its value.
fn bar_chart(title: &str, rows: &[(String, f64, String)], color: &str) -> String {
    let max = rows.iter().map(|r| r.1).fold(0f64, f64::max).max(f64::MIN_POSITIVE);
    let (label_w, bar_w, row_h) = (260.0, 420.0, 18.0);
    let height = 30.0 + row_h * rows.len() as f64;
    let mut svg = format!(
        r#"<h2>{}</h2><svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" role="img" aria-label="{}">"#,
        esc(title),
        label_w + bar_w + 120.0,
        esc(title)
    );
    for (i, (name, value, text)) in rows.iter().enumerate() {
        let y = 20.0 + row_h * i as f64;
        let w = (value / max * bar_w).max(0.5);
        let _ = write!(
            svg,
            r#"<text x="{:.0}" y="{:.0}" font-size="11" text-anchor="end">{}</text><rect x="{label_w}" y="{:.0}" width="{w:.1}" height="{:.0}" fill="{color}"><title>{}: {}</title></rect><text x="{:.0}" y="{:.0}" font-size="11">{}</text>"#,
            label_w - 6.0,
            y + 12.0,
            esc(name),
            y + 2.0,
            row_h - 4.0,
            esc(name),
            esc(text),
            label_w + w + 4.0,
            y + 12.0,
            esc(text)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn fmt_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v))
}

/// Quality before and after, on the job's dataset.
fn evaluation_table(e: &crate::graph::eval::Evaluation) -> String {
    let loss = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.4}"));
    format!(
        "<h2>Evaluation on {} samples</h2><table><tr><th></th><th>accuracy</th><th>cross-entropy</th></tr>\
         <tr><td>original</td><td>{}</td><td>{}</td></tr><tr><td>compressed</td><td>{}</td><td>{}</td></tr></table>\
         <p>Top-1 agreement with the original {:.2}%, mean KL(original &#8741; compressed) {:.3e} nats, output relative error {:.3}%.</p>",
        e.samples,
        percent(e.before.accuracy),
        loss(e.before.loss),
        percent(e.after.accuracy),
        loss(e.after.loss),
        100.0 * e.top1_agreement,
        e.kl_mean,
        100.0 * e.output_relative_error
    )
}

/// A language model's perplexity before and after, on the evaluation text.
fn text_evaluation_table(e: &crate::compress::engine::text_eval::TextEvaluation) -> String {
    format!(
        "<h2>Evaluation on {} tokens of text ({} predictions, chunks of {})</h2><table><tr><th></th><th>perplexity</th></tr>\
         <tr><td>original</td><td>{:.4}</td></tr><tr><td>compressed (<code>{}</code>)</td><td>{:.4}</td></tr></table>\
         <p>Top-1 agreement with the original {:.2}%, mean KL(original &#8741; compressed) {:.3e} nats.</p>",
        e.tokens,
        e.predictions,
        e.context,
        e.perplexity_before,
        esc(&e.artifact),
        e.perplexity_after,
        100.0 * e.top1_agreement,
        e.kl_mean
    )
}

/// An encoder's embeddings before and after, on the evaluation passages.
fn embedding_evaluation_table(e: &crate::compress::engine::embed_eval::EmbeddingEvaluation) -> String {
    format!(
        "<h2>Embeddings of {} passages ({} tokens, up to {} per passage), original vs <code>{}</code></h2>\
         <table><tr><th>cosine of passage embeddings (mean pooling)</th><td>mean {:.6}, min {:.6}</td></tr>\
         <tr><th>cosine of token hidden states</th><td>mean {:.6}</td></tr>\
         <tr><th>nearest-neighbour agreement</th><td>{:.2}%</td></tr></table>",
        e.passages,
        e.tokens,
        e.context,
        esc(&e.artifact),
        e.cosine_mean,
        e.cosine_min,
        e.token_cosine_mean,
        100.0 * e.neighbour_agreement
    )
}

/// The training loss (red, scaled to its maximum), the training accuracy (green) and the
/// validation accuracy (blue, 0 to 1) per epoch of a distillation, as an inline SVG line chart.
fn training_chart(t: &crate::graph::train::TrainingRecord) -> String {
    let (w, h, pad) = (420.0, 120.0, 20.0);
    let n = t.epochs.len().max(2) as f64 - 1.0;
    let max_loss = t.epochs.iter().map(|e| e.loss).fold(f64::MIN_POSITIVE, f64::max);
    let line = |value: &dyn Fn(&crate::graph::train::EpochRecord) -> f64| -> String {
        t.epochs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                format!("{:.1},{:.1}", pad + i as f64 / n * (w - 2.0 * pad), h - pad - value(e) * (h - 2.0 * pad))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<br><svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="training loss and validation accuracy per epoch"><rect x="0" y="0" width="{w}" height="{h}" fill="none" stroke="#ddd"/><polyline fill="none" stroke="#d9534f" stroke-width="2" points="{}"><title>training loss (max {max_loss:.3})</title></polyline><polyline fill="none" stroke="#5cb85c" stroke-width="2" points="{}"><title>training accuracy</title></polyline><polyline fill="none" stroke="#337ab7" stroke-width="2" points="{}"><title>validation accuracy</title></polyline><text x="{pad}" y="14" font-size="11">loss (red, max {max_loss:.3}), training (green) and validation accuracy (blue) over {} epochs of {:.2} s on average; kept: epoch {}</text></svg>"##,
        line(&|e| e.loss / max_loss),
        line(&|e| e.train_accuracy),
        line(&|e| e.validation_accuracy),
        t.epochs.len(),
        t.epochs.iter().map(|e| e.seconds).sum::<f64>() / t.epochs.len().max(1) as f64,
        t.best_epoch
    )
}

/// What each structural step did: units, layers, factors and the proof.
fn structure_list(steps: &[crate::compress::ops::structural::StructureRecord]) -> String {
    let mut html = String::from("<h2>Structural steps</h2><ul>");
    for s in steps {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(
            s.groups
                .iter()
                .map(|g| format!("{}: {} &rarr; {} units", esc(&g.layers.join(" + ")), g.units_before, g.units_after)),
        );
        parts.extend(
            s.layers
                .iter()
                .filter(|l| l.dropped)
                .map(|l| format!("dropped {}", esc(l.name.as_deref().unwrap_or(&l.pointer)))),
        );
        parts.extend(s.factors.iter().map(|f| {
            format!(
                "{} rank {} ({:.1}% of the energy, relative error {:.3})",
                esc(&f.layer),
                f.rank,
                100.0 * f.energy,
                f.relative_error
            )
        }));
        let proof = s.proof.as_ref().map_or(String::new(), |p| {
            format!(
                "; proof: {:.2e} from the {} (tolerance {:.0e})",
                p.max_relative_difference,
                esc(&p.reference),
                p.tolerance
            )
        });
        let chart = s.training.as_ref().map_or(String::new(), training_chart);
        let _ = write!(
            html,
            "<li>step {} <code>{}</code>: {} &rarr; {} parameters; {}{proof}{chart}</li>",
            s.step,
            esc(&s.op),
            s.parameters_before,
            s.parameters_after,
            parts.join("; ")
        );
    }
    html.push_str("</ul>");
    html
}

pub fn render(r: &Report) -> String {
    let t = &r.totals;
    let mut html = String::from(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ModelPress report</title><style>
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#222}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f4f4f4}.note{color:#a60;text-align:left}.sum{font-size:16px}</style></head><body><h1>ModelPress report</h1>"#,
    );
    let _ = write!(
        html,
        r#"<p class="sum">{} tensors ({} changed), {} &rarr; {} (&times;{:.2}), {:.3} bits per weight, {:.1}% zeros. Engine {}, {:.0} ms.</p>"#,
        t.tensors,
        t.tensors_changed,
        fmt_bytes(t.bytes_in),
        fmt_bytes(t.bytes_out),
        t.ratio,
        t.bits_per_weight,
        100.0 * (1.0 - t.nonzeros as f64 / t.parameters.max(1) as f64),
        esc(&r.engine),
        r.duration_ms
    );
    html.push_str("<ul>");
    for o in &r.outputs {
        let _ = write!(html, "<li><code>{}</code> ({}): {}</li>", esc(&o.artifact), esc(&o.format), fmt_bytes(o.bytes));
    }
    html.push_str("</ul>");
    if let Some(e) = &r.evaluation {
        html.push_str(&evaluation_table(e));
    }
    if let Some(e) = &r.embedding_evaluation {
        html.push_str(&embedding_evaluation_table(e));
    }
    if let Some(e) = &r.text_evaluation {
        html.push_str(&text_evaluation_table(e));
    }
    if !r.structure.is_empty() {
        html.push_str(&structure_list(&r.structure));
    }
    let changed: Vec<_> = r.tensors.iter().filter(|x| x.error.is_some()).collect();
    let err_rows: Vec<(String, f64, String)> = changed
        .iter()
        .map(|x| {
            let e = x.error.as_ref().map_or(0.0, |e| e.relative_error);
            (x.name.clone(), e, format!("{:.3}%", 100.0 * e))
        })
        .collect();
    // A summary report (or a job that changed nothing) has no error figures to draw.
    if !err_rows.is_empty() {
        html.push_str(&bar_chart("Relative error per changed tensor", &err_rows, "#d9534f"));
    }
    let bit_rows: Vec<(String, f64, String)> = r
        .tensors
        .iter()
        .map(|x| (x.name.clone(), x.bits_per_weight, format!("{:.2} bits ({})", x.bits_per_weight, x.scheme)))
        .collect();
    html.push_str(&bar_chart("Bits per weight per tensor", &bit_rows, "#337ab7"));
    html.push_str("<h2>Ledger</h2><table><tr><th>tensor</th><th>shape</th><th>dtype</th><th>scheme</th><th>bytes in</th><th>bytes out</th><th>bits/w</th><th>sparsity</th><th>rel. error</th><th>SQNR dB</th><th>cosine</th><th>max abs err</th><th>ms</th><th>notes</th></tr>");
    for x in &r.tensors {
        let (rel, sqnr, cos, max) = match &x.error {
            Some(e) => (
                format!("{:.4}%", 100.0 * e.relative_error),
                e.sqnr_db.map_or("∞".into(), |s| format!("{s:.1}")),
                format!("{:.6}", e.cosine),
                format!("{:.3e}", e.max_abs_error),
            ),
            None => Default::default(),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}%</td><td>{rel}</td><td>{sqnr}</td><td>{cos}</td><td>{max}</td><td>{:.1}</td><td class=\"note\">{}</td></tr>",
            esc(&x.name),
            x.shape_in,
            esc(&x.dtype_in),
            esc(&x.scheme),
            x.bytes_in,
            x.bytes_out,
            x.bits_per_weight,
            100.0 * x.sparsity,
            x.milliseconds,
            esc(&x.notes.join("; "))
        );
    }
    html.push_str("</table></body></html>\n");
    html
}
