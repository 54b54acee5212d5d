//! `report/index.html`: one self-contained page (no network; images inlined as data URIs) with
//! each run's pipeline and configuration, the tables, the charts and the gallery of held-out
//! captions beside their images.

use std::fmt::Write;
use std::path::Path;

use base64::Engine;

use crate::stages::report::gallery::Gallery;
use crate::stages::report::table::{significant, Table};

/// A chart as the page shows it.
#[derive(Debug, Clone)]
pub struct ChartFile {
    pub title: String,
    /// File names of the PNG and SVG beside the page.
    pub png_name: String,
    pub svg_name: String,
    pub png: Vec<u8>,
}

/// One step of a run, from its `run.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLine {
    pub name: String,
    pub outcome: String,
    pub seconds: f64,
    /// The summary of a finished step, the error of a failed one.
    pub text: String,
}

/// What the page says about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub run_id: String,
    pub pipeline: String,
    pub steps: Vec<StepLine>,
    pub config: String,
}

impl RunSummary {
    /// From `runs/<run_id>/run.json` and `config.toml`; what is missing is left empty.
    pub fn read(workdir: &Path, run_id: &str) -> Self {
        let dir = workdir.join("runs").join(run_id);
        let record: serde_json::Value =
            crate::io::read_json(&dir.join("run.json")).unwrap_or_default();
        let steps = record["steps"]
            .as_array()
            .map(|steps| {
                steps
                    .iter()
                    .map(|s| {
                        let o = &s[1];
                        StepLine {
                            name: s[0].as_str().unwrap_or_default().to_string(),
                            outcome: o["outcome"].as_str().unwrap_or_default().to_string(),
                            seconds: o["seconds"].as_f64().unwrap_or(f64::NAN),
                            text: o["summary"]
                                .as_str()
                                .or(o["error"].as_str())
                                .unwrap_or_default()
                                .to_string(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            run_id: run_id.to_string(),
            pipeline: record["pipeline"].as_str().unwrap_or_default().to_string(),
            steps,
            config: std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default(),
        }
    }
}

/// `s` safe as HTML text or a quoted attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem auto;max-width:1400px;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.2rem .45rem;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.failed{color:#b00020;font-weight:600}.done{color:#1b7a1b}
pre{background:#f7f7f7;padding:.6rem;overflow:auto;max-height:24rem;font-size:.8rem}
.charts{display:flex;flex-wrap:wrap;gap:1rem}.charts figure{margin:0}
.charts img{max-width:100%;width:660px;border:1px solid #eee}
figcaption{font-size:.8rem;color:#555}
.entry{display:flex;gap:1rem;border-top:1px solid #eee;padding:.6rem 0}
.entry img.thumb{width:128px;height:auto;image-rendering:pixelated;border:1px solid #ccc;flex:none}
.entry .missing{width:128px;height:96px;background:#eee;color:#888;font-size:.75rem;display:flex;align-items:center;justify-content:center;flex:none}
.entry table{margin:.2rem 0}.key{font-family:monospace;font-size:.8rem;color:#555}
.refs{font-size:.85rem;color:#333;margin:.2rem 0}
.scroll{overflow-x:auto}pre.legend{background:none;padding:0}
#gallery.only-differ .entry[data-differ="0"]{display:none}
"#;

const SCRIPT: &str = r#"
(function(){
  var box=document.getElementById('differ-only'),g=document.getElementById('gallery'),n=document.getElementById('shown');
  if(!box||!g)return;
  function update(){
    g.classList.toggle('only-differ',box.checked);
    var all=g.querySelectorAll('.entry'),shown=0;
    for(var i=0;i<all.length;i++){if(all[i].offsetParent!==null)shown++;}
    n.textContent=shown+' of '+all.length+' images shown';
  }
  box.addEventListener('change',update);update();
})();
"#;

fn table_html(out: &mut String, t: &Table) {
    let _ = write!(
        out,
        "<h3>{}</h3>\n<div class=\"scroll\"><table class=\"report-table\">\n<tr>",
        escape(&t.title)
    );
    for c in &t.columns {
        let _ = write!(out, "<th>{}</th>", escape(c));
    }
    out.push_str("</tr>\n");
    for r in &t.rows {
        out.push_str("<tr>");
        for c in r {
            let class = if c.is_numeric() { " class=\"num\"" } else { "" };
            let _ = write!(out, "<td{class}>{}</td>", escape(&c.to_string()));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table></div>\n");
}

/// `text` as a cell: a long one collapsed behind its first words.
fn long_text(text: &str) -> String {
    const SHORT: usize = 160;
    if text.chars().count() <= SHORT {
        return escape(text);
    }
    let head: String = text.chars().take(SHORT).collect();
    format!(
        "<details><summary>{}…</summary>{}</details>",
        escape(&head),
        escape(text)
    )
}

fn runs_html(out: &mut String, runs: &[RunSummary]) {
    for run in runs {
        let _ = write!(
            out,
            "<h3>run <code>{}</code>{}</h3>\n<table class=\"steps\"><tr><th>step</th><th>outcome</th><th>seconds</th><th>summary</th></tr>\n",
            escape(&run.run_id),
            if run.pipeline.is_empty() {
                String::new()
            } else {
                format!(" (pipeline <code>{}</code>)", escape(&run.pipeline))
            }
        );
        for s in &run.steps {
            let class = if s.outcome == "failed" {
                "failed"
            } else {
                "done"
            };
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"{class}\">{}</td><td class=\"num\">{:.1}</td><td>{}</td></tr>",
                escape(&s.name),
                escape(&s.outcome),
                s.seconds,
                long_text(&s.text)
            );
        }
        out.push_str("</table>\n");
        if !run.config.is_empty() {
            let _ = writeln!(
                out,
                "<details><summary>resolved configuration</summary><pre>{}</pre></details>",
                escape(&run.config)
            );
        }
    }
}

fn gallery_html(out: &mut String, g: &Gallery) {
    let differ = g.entries.iter().filter(|e| e.differs()).count();
    let _ = writeln!(
        out,
        "<p><label><input type=\"checkbox\" id=\"differ-only\"> only images whose captions differ between models ({differ} of {})</label> · <span id=\"shown\"></span>{}</p>",
        g.entries.len(),
        if g.omitted > 0 {
            format!(" · {} more image(s) not shown (<code>report.gallery_images</code>)", g.omitted)
        } else {
            String::new()
        }
    );
    out.push_str("<div id=\"gallery\">\n");
    for e in &g.entries {
        let _ = write!(
            out,
            "<div class=\"entry\" data-key=\"{}\" data-differ=\"{}\">",
            escape(&e.image_key),
            u8::from(e.differs())
        );
        match &e.thumbnail {
            Some(t) => {
                let _ = write!(
                    out,
                    "<img class=\"thumb\" alt=\"{}\" src=\"{}\">",
                    escape(&e.image_key),
                    data_uri("image/jpeg", t)
                );
            }
            None => out.push_str("<div class=\"missing\">no image</div>"),
        }
        let _ = write!(
            out,
            "<div><div class=\"key\">{} · {}</div>",
            escape(&e.image_key),
            escape(&e.source)
        );
        if !e.references.is_empty() {
            let refs: Vec<String> = e.references.iter().map(|r| escape(r)).collect();
            let _ = write!(
                out,
                "<div class=\"refs\"><b>references:</b> {}</div>",
                refs.join(" · ")
            );
        }
        // One column per score any caption of the image has.
        let mut names: Vec<&str> = Vec::new();
        for c in &e.captions {
            for (n, _) in &c.scores {
                if !names.contains(n) {
                    names.push(n);
                }
            }
        }
        out.push_str("<table class=\"captions\"><tr><th>model</th><th>caption</th>");
        for n in &names {
            let _ = write!(out, "<th>{}</th>", escape(n));
        }
        out.push_str("</tr>");
        for c in &e.captions {
            let _ = write!(
                out,
                "<tr class=\"caption\"><td>{}</td><td>{}</td>",
                escape(&c.model),
                escape(&c.caption)
            );
            for n in &names {
                let v = c.scores.iter().find(|(m, _)| m == n).map(|(_, v)| *v);
                let text = v.map(|v| significant(v, 3)).unwrap_or_default();
                let _ = write!(out, "<td class=\"num\">{text}</td>");
            }
            out.push_str("</tr>");
        }
        out.push_str("</table></div></div>\n");
    }
    out.push_str("</div>\n");
}

/// The page.
pub fn page(
    title: &str,
    legend: &str,
    runs: &[RunSummary],
    tables: &[Table],
    charts: &[ChartFile],
    gallery: &Gallery,
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{STYLE}</style></head>\n<body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    out.push_str("<h2 id=\"runs\">Runs</h2>\n");
    runs_html(&mut out, runs);
    let _ = writeln!(
        out,
        "<h2 id=\"tables\">Tables</h2>\n<pre class=\"legend\">{}</pre>",
        escape(legend.trim_end())
    );
    for t in tables {
        table_html(&mut out, t);
    }
    out.push_str("<h2 id=\"charts\">Charts</h2>\n<div class=\"charts\">\n");
    for c in charts {
        let _ = writeln!(
            out,
            "<figure class=\"chart\"><img alt=\"{}\" src=\"{}\"><figcaption>{} · <a href=\"{}\">PNG</a> · <a href=\"{}\">SVG</a></figcaption></figure>",
            escape(&c.title),
            data_uri("image/png", &c.png),
            escape(&c.title),
            escape(&c.png_name),
            escape(&c.svg_name)
        );
    }
    out.push_str("</div>\n<h2 id=\"gallery-title\">Held-out captions</h2>\n");
    if gallery.entries.is_empty() {
        out.push_str("<p>No captions: the runs have no <code>generations.parquet</code>.</p>\n");
    } else {
        gallery_html(&mut out, gallery);
    }
    let _ = write!(out, "<script>{SCRIPT}</script>\n</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::report::gallery::{Caption, Entry};

    #[test]
    fn special_characters_are_escaped_everywhere() {
        assert_eq!(
            escape(r#"<b>"a" & 'b'</b> é �"#),
            "&lt;b&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/b&gt; é �"
        );
        let g = Gallery {
            entries: vec![Entry {
                image_key: "k<1>".into(),
                source: "synthetic/val".into(),
                thumbnail: Some(vec![1, 2, 3]),
                references: vec!["a \"red\" circle".into()],
                captions: vec![Caption {
                    model: "m & n".into(),
                    caption: "<script>alert(1)</script> ünïcode \u{FFFD}".into(),
                    scores: vec![("CIDEr", 1.23456)],
                }],
            }],
            omitted: 0,
        };
        let html = page("report <x>", "run x", &[], &[], &[], &g);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; ünïcode \u{FFFD}"));
        assert!(html.contains("data-key=\"k&lt;1&gt;\"") && html.contains("m &amp; n"));
        assert!(html.contains("<th>CIDEr</th>") && html.contains(">1.23<"));
        assert!(html.contains("data:image/jpeg;base64,AQID"));
        assert_eq!(
            html.matches("<script>").count(),
            1,
            "only the page's own script"
        );
    }
}
