//! The report's charts, drawn with plotters: line charts of metric curves (integer step ticks,
//! train and validation on one axis, a point on every validation) and a bar chart comparing
//! models. Each is drawn twice, into an RGB buffer (PNG, encoded by `image`) and as SVG. Text
//! uses DejaVu Sans compiled into the binary, so a PNG is the same on every machine.

use std::ops::Range;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};

/// One named curve: (x, y) points in x order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Tableau 10, matplotlib's default cycle.
pub const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Size of a line chart, in pixels.
pub const LINE_SIZE: (u32, u32) = (720, 440);

fn colour(i: usize) -> RGBColor {
    let [r, g, b] = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Palette colour `i`, lightened towards white by `shade` steps (0: the colour itself): the
/// second decoding method of a model is a lighter bar of the model's colour.
pub fn shaded(i: usize, shade: usize) -> [u8; 3] {
    let t = (shade as f64 * 0.4).min(0.8);
    PALETTE[i % PALETTE.len()].map(|c| (c as f64 + (255.0 - c as f64) * t).round() as u8)
}

/// One bar of a bar chart's panels: its legend label and colour.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub colour: [u8; 3],
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// A chart in both formats.
#[derive(Debug, Clone)]
pub struct Chart {
    pub png: Vec<u8>,
    pub svg: String,
}

fn fonts() {
    static FONTS: Once = Once::new();
    FONTS.call_once(|| {
        // The bytes are DejaVu's own TTF files; they parse.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

fn derr(what: &str) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Config(format!("report: drawing {what}: {e}"))
}

/// `v` with 3 significant digits and no trailing zeros, as tick labels read.
pub fn short_number(v: f64) -> String {
    let s = crate::stages::report::table::significant(v, 3);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Draws `title`'s curves with both backends.
fn render(
    size: (u32, u32),
    what: &str,
    draw: impl Fn(DrawingArea<BitMapBackend, Shift>) -> std::result::Result<(), String>,
    draw_svg: impl Fn(DrawingArea<SVGBackend, Shift>) -> std::result::Result<(), String>,
) -> Result<Chart> {
    fonts();
    let mut rgb = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        draw(root).map_err(derr(what))?;
    }
    let img = image::RgbImage::from_raw(size.0, size.1, rgb)
        .ok_or_else(|| Error::Config(format!("report: drawing {what}: buffer size")))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Config(format!("report: encoding {what}: {e}")))?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        draw_svg(root).map_err(derr(what))?;
    }
    Ok(Chart { png, svg })
}

/// The padded range of `values` (a single value gets a unit-wide range around it).
fn span(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        return lo - pad..hi + pad;
    }
    let pad = (hi - lo) * 0.06;
    lo - pad..hi + pad
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    series: &[Series],
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let steps = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0.round() as i64));
    let (lo, hi) = steps.fold((i64::MAX, i64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (lo, hi) = if lo > hi { (0, 1) } else { (lo, hi) };
    // A one-step curve still gets an axis around its step.
    let xs = if lo == hi { lo - 1..hi + 1 } else { lo..hi };
    let ys = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(xs, ys)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_labels(8)
        .y_labels(8)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| short_number(*y))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(e)?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let points: Vec<(i64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|p| (p.0.round() as i64, p.1))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(e)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        // Sparse curves (validations, a stage with few steps) show each point.
        if points.len() <= 40 {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(e)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

/// A line chart of `series` against integer steps.
pub fn line_chart(title: &str, x_label: &str, series: &[Series]) -> Result<Chart> {
    render(
        LINE_SIZE,
        title,
        |root| draw_lines(root, title, x_label, series),
        |root| draw_lines(root, title, x_label, series),
    )
}

/// One panel of a bar chart: a metric and one value per bar (NaN: no bar).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub metric: String,
    pub values: Vec<f64>,
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    bars: &[Bar],
    panels: &[Panel],
    columns: usize,
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(e)?;
    let legend_rows = bars.len().div_ceil(3);
    let (legend, grid) = root.split_vertically(12 + 20 * legend_rows as u32);
    let width = legend.dim_in_pixel().0 as i32;
    for (i, bar) in bars.iter().enumerate() {
        let (x, y) = (12 + (i % 3) as i32 * (width / 3), 6 + (i / 3) as i32 * 20);
        legend
            .draw(&Rectangle::new(
                [(x, y + 2), (x + 14, y + 14)],
                rgb(bar.colour).filled(),
            ))
            .map_err(e)?;
        legend
            .draw(&Text::new(
                bar.label.clone(),
                (x + 20, y),
                ("sans-serif", 14),
            ))
            .map_err(e)?;
    }
    let rows = panels.len().div_ceil(columns);
    for (panel, area) in panels.iter().zip(grid.split_evenly((rows, columns))) {
        let hi = panel
            .values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, &v| a.max(v));
        let lo = panel
            .values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, &v| a.min(v));
        let top = if hi > 0.0 { hi * 1.12 } else { 1.0 };
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.metric, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(8)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..bars.len() as f64, lo.min(0.0)..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_labels(5)
            .y_label_formatter(&|y| short_number(*y))
            .label_style(("sans-serif", 13))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        for (i, v) in panel.values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = i as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x + 0.12, 0.0), (x + 0.88, *v)],
                    rgb(bars[i].colour).filled(),
                )))
                .map_err(e)?;
            // Values over the bars while they have room; the tables have them all.
            if bars.len() > 6 {
                continue;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    short_number(*v),
                    (x + 0.15, *v + top * 0.02),
                    ("sans-serif", 11),
                )))
                .map_err(e)?;
        }
    }
    root.present().map_err(e)
}

/// Small multiples: one panel per metric, one coloured bar per entry of `bars` (a model and
/// method), with a legend above.
pub fn bar_chart(title: &str, bars: &[Bar], panels: &[Panel]) -> Result<Chart> {
    let columns = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(columns).max(1) as u32;
    let legend = 12 + 20 * bars.len().div_ceil(3) as u32;
    let size = (960, 40 + legend + 240 * rows);
    render(
        size,
        title,
        |root| draw_bars(root, title, bars, panels, columns),
        |root| draw_bars(root, title, bars, panels, columns),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts of an SVG's `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    fn count(img: &image::RgbImage, c: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == c).count()
    }

    #[test]
    fn line_chart_draws_each_series_in_its_colour_with_text_and_svg() {
        let series = vec![
            Series {
                name: "train loss".into(),
                points: (0..10).map(|i| (i as f64, 0.5 - i as f64 * 0.04)).collect(),
            },
            Series {
                name: "val loss".into(),
                points: vec![(0.0, 0.4), (9.0, 0.2), (5.0, f64::NAN)],
            },
        ];
        let chart = line_chart("train-sft loss", "step", &series).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), LINE_SIZE);
        for c in &PALETTE[..2] {
            let n = count(&img, *c);
            assert!(n > 100, "colour {c:?}: {n} pixels");
        }
        assert_eq!(count(&img, PALETTE[2]), 0);
        // Anti-aliased text: grey levels between black and white.
        let grey = img
            .pixels()
            .filter(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2] && (40..200).contains(&p.0[0]))
            .count();
        assert!(grey > 200, "{grey} grey pixels");
        assert!(chart.svg.starts_with("<svg"), "{}", &chart.svg[..40]);
        let t = texts(&chart.svg);
        for text in ["train-sft loss", "train loss", "val loss", "step"] {
            assert!(t.iter().any(|x| x == text), "{text}: {t:?}");
        }
        // The losses stay below 1, so every number from 1 up is a step tick: integers only.
        let ticks: Vec<f64> = t
            .iter()
            .filter_map(|x| x.parse().ok())
            .filter(|v| *v >= 1.0)
            .collect();
        assert!(
            ticks.len() >= 4 && ticks.iter().all(|v| v.fract() == 0.0),
            "{t:?}"
        );
    }

    #[test]
    fn a_one_step_curve_still_gets_a_chart() {
        let chart = line_chart(
            "x",
            "step",
            &[Series {
                name: "val loss".into(),
                points: vec![(3.0, 1.5)],
            }],
        )
        .unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        assert!(count(&img, PALETTE[0]) > 10);
    }

    #[test]
    fn bar_chart_draws_a_bar_per_model_in_every_panel() {
        let bars: Vec<Bar> = ["untrained greedy", "train-sft greedy"]
            .iter()
            .enumerate()
            .map(|(i, l)| Bar {
                label: l.to_string(),
                colour: PALETTE[i],
            })
            .collect();
        let panels = vec![
            Panel {
                metric: "CIDEr".into(),
                values: vec![0.1, 5.0],
            },
            Panel {
                metric: "CLIPScore".into(),
                values: vec![1.5, f64::NAN],
            },
        ];
        let chart = bar_chart("scores", &bars, &panels).unwrap();
        let img = image::load_from_memory(&chart.png).unwrap().to_rgb8();
        assert!(count(&img, PALETTE[0]) > 300 && count(&img, PALETTE[1]) > 1000);
        let t = texts(&chart.svg);
        for text in ["CIDEr", "CLIPScore", "train-sft greedy", "5"] {
            assert!(t.iter().any(|x| x == text), "{text}: {t:?}");
        }
    }

    #[test]
    fn short_numbers_keep_three_significant_digits() {
        assert_eq!(short_number(64.8), "64.8");
        assert_eq!(short_number(0.12345), "0.123");
        assert_eq!(short_number(2.0), "2");
        assert_eq!(short_number(1234.6), "1235");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(1.5e-5), "1.50e-5");
    }
}
