//! Line charts as PNG, drawn with the `image` crate and a built-in 3×5 pixel font, so report
//! curves render the same on every machine without system fonts.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

/// One named curve: (x, y) points in x order.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// 3×5 glyphs, one row per 3 bits, top row first.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '/' => [1, 1, 2, 4, 4],
        ':' => [0, 2, 0, 2, 0],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [7, 4, 4, 4, 7],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [7, 4, 5, 5, 7],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 7],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [7, 5, 5, 5, 7],
        'p' => [7, 5, 7, 4, 4],
        'q' => [7, 5, 5, 7, 1],
        'r' => [6, 5, 6, 5, 5],
        's' => [7, 4, 7, 1, 7],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 7, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        _ => [0, 0, 0, 0, 0],
    }
}

/// Draws `text` with its top-left corner at (x, y), `scale` pixels per font pixel.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, colour: [u8; 3]) {
    for (i, c) in s.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(
                                img,
                                x + (i as i64 * 4 + col) * scale + dx,
                                y + row as i64 * scale + dy,
                                colour,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// A 2-pixel line from (x0, y0) to (x1, y1).
fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            put(img, x as i64 + dx, y as i64 + dy, c);
        }
    }
}

/// A compact label for an axis value.
fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws the series as lines on shared axes with a title, axis ticks and a legend, and writes
/// a PNG to `path` (atomically).
pub fn line_chart(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    let (w, h) = (720u32, 440u32);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (70.0, w as f64 - 20.0, 40.0, h as f64 - 50.0);
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
    let sy = |y: f64| bottom - (y - y0) / (y1 - y0) * (bottom - top);
    let grey = [200, 200, 200];
    let black = [30, 30, 30];
    for i in 0..=4 {
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        line(&mut img, (left, sy(fy)), (right, sy(fy)), grey);
        text(&mut img, 4, sy(fy) as i64 - 5, &label(fy), 2, black);
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        text(
            &mut img,
            sx(fx) as i64 - 10,
            bottom as i64 + 8,
            &label(fx),
            2,
            black,
        );
    }
    line(&mut img, (left, top), (left, bottom), black);
    line(&mut img, (left, bottom), (right, bottom), black);
    text(&mut img, left as i64, 10, title, 3, black);
    text(
        &mut img,
        (right - 8.0 * x_label.len() as f64) as i64,
        h as i64 - 18,
        x_label,
        2,
        black,
    );
    for (i, s) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        let finite: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        for pair in finite.windows(2) {
            line(
                &mut img,
                (sx(pair[0].0), sy(pair[0].1)),
                (sx(pair[1].0), sy(pair[1].1)),
                c,
            );
        }
        if finite.len() == 1 {
            line(
                &mut img,
                (sx(finite[0].0) - 2.0, sy(finite[0].1)),
                (sx(finite[0].0) + 2.0, sy(finite[0].1)),
                c,
            );
        }
        let ly = top as i64 + 6 + 16 * i as i64;
        line(
            &mut img,
            (right - 170.0, ly as f64 + 4.0),
            (right - 150.0, ly as f64 + 4.0),
            c,
        );
        text(&mut img, right as i64 - 144, ly, &s.name, 2, black);
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: format!("encoding PNG: {e}"),
        })?;
    crate::io::write_atomic(path, bytes.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_draws_each_series_in_its_colour() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let series = vec![
            Series {
                name: "train loss".into(),
                points: (0..10).map(|i| (i as f64, 5.0 - i as f64 * 0.4)).collect(),
            },
            Series {
                name: "val loss".into(),
                points: vec![(0.0, 4.0), (9.0, 2.0), (5.0, f64::NAN)],
            },
        ];
        line_chart(&path, "train-sft", "step", &series).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (720, 440));
        for c in &PALETTE[..2] {
            let n = img.pixels().filter(|p| p.0 == *c).count();
            assert!(n > 100, "colour {c:?}: {n} pixels");
        }
        assert!(img.pixels().all(|p| p.0 != PALETTE[2]));
    }
}
