//! The embedded synthetic world: deterministic images of coloured shapes with grounded
//! captions, preference pairs and short stories, written through the same shard writer and
//! schemas as the real sources.
//!
//! The world is kept small and regular on purpose: the default pipeline trains a tiny CLIP
//! and a tiny GPT-2 captioner on it in about a minute, so every caption must be derivable
//! from the pixels and the vocabulary must be learnable from a few hundred images.
//!
//! # Images and captions
//!
//! Every image is a plain light background with two shapes of *different* colours that
//! never overlap. Its caption follows one grammar, all lowercase:
//!
//! ```text
//! caption  := article shape " " relation " " article shape
//! article  := "an " before orange, "a " otherwise
//! shape    := colour " " kind
//! colour   := red | green | blue | yellow | purple | orange
//! kind     := circle | square | triangle
//! relation := above | below | "left of" | "right of"
//! ```
//!
//! e.g. `a red circle above a blue square`: the first shape (the *subject*) stands in the
//! relation to the second (the *object*). A relation is read off the dominant axis between
//! the two shapes' centres, and layouts keep that axis dominant by a wide margin so no image
//! is ambiguous. All shapes have one size, so the captions carry no size words.
//!
//! # Stories
//!
//! A story keeps its two shapes; the subject either steps along the axis across the
//! relation (bouncing at the edge of its range) or cycles through the colours. Frame 0 is
//! captioned like an image; every later frame says what changed since the previous one:
//!
//! ```text
//! story_caption := "the " shape " " change "; it is " relation " the " shape
//! change        := "moves " (up | down | left | right) | "turns " colour
//! ```
//!
//! # Files
//!
//! | directory | record |
//! | --- | --- |
//! | `data/synthetic/{train,val}/` | [`ImageTextSample`], key `syn-<split>-NNNNNN` |
//! | `data/synthetic_prefs/{train,val}/` | [`PreferencePair`] about the same split's images |
//! | `data/synthetic_stories/{train,val}/` | [`StoryFrame`], story id `syn-story-<split>-NNNN` |

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::Path;
use std::time::Instant;

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::records::{ImageTextSample, PreferencePair, Record, SampleStatus, StoryFrame};
use crate::data::shard::{ShardSet, ShardStats};
use crate::error::{Error, IoContext, Result};
use crate::imaging::resize::encode_jpeg;
use crate::progress::Progress;
use crate::rng::SplitMix64;
use crate::stages::ingest::{SourceSummary, SplitSummary};

/// `[ingest.synthetic]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub train_images: usize,
    pub val_images: usize,
    pub image_size: u32,
    pub shard_size: usize,
    pub pairs_per_image: usize,
    pub train_stories: usize,
    pub val_stories: usize,
    pub frames_per_story: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            train_images: 256,
            val_images: 64,
            image_size: 64,
            shard_size: 128,
            pairs_per_image: 2,
            train_stories: 24,
            val_stories: 8,
            frames_per_story: 6,
        }
    }
}

/// Dataset (directory under `data/`) of the captioned images.
pub const IMAGES_DATASET: &str = "synthetic";
/// Dataset of the preference pairs about those images.
pub const PAIRS_DATASET: &str = "synthetic_prefs";
/// Dataset of the story frames.
pub const STORIES_DATASET: &str = "synthetic_stories";

/// Quality of the stored JPEGs: high enough that flat colours survive unchanged inside
/// the shapes (and the encoder keeps full-resolution chroma from 90 up).
const JPEG_QUALITY: u8 = 95;

/// Below this many pixels the shapes are a handful of JPEG blocks and stop being
/// recognisable, so the captions would no longer be grounded.
const MIN_IMAGE_SIZE: u32 = 16;

// ---------------------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------------------

/// The colour of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    /// Also the order of the colour cycle in stories.
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.word() == word)
    }

    /// The fill drawn for this colour. Saturated and at least ~70 apart (Euclidean RGB) from
    /// each other and from the background, so a tiny vision encoder cannot confuse them and
    /// a test can classify pixels by nearest palette entry.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 40, 40],
            Colour::Green => [40, 160, 60],
            Colour::Blue => [40, 80, 215],
            Colour::Yellow => [235, 205, 35],
            Colour::Purple => [140, 60, 180],
            Colour::Orange => [240, 135, 30],
        }
    }

    /// The colour after `self` in the story cycle, skipping `avoid` so the two shapes of a
    /// story never share a colour.
    pub fn next_in_cycle(self, avoid: Colour) -> Colour {
        let at = Self::ALL.iter().position(|c| *c == self).unwrap_or(0);
        let next = Self::ALL[(at + 1) % Self::ALL.len()];
        if next == avoid {
            Self::ALL[(at + 2) % Self::ALL.len()]
        } else {
            next
        }
    }
}

/// The plain light background every image is drawn on.
pub const BACKGROUND: [u8; 3] = [245, 245, 240];

/// The kind of a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    pub fn word(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }

    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.word() == word)
    }
}

/// Where the subject stands relative to the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    pub fn words(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
        }
    }

    /// The relation with subject and object exchanged (`above` <-> `below`).
    pub fn opposite(self) -> Relation {
        match self {
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
        }
    }

    /// Whether the shapes are separated along the vertical axis.
    pub fn is_vertical(self) -> bool {
        matches!(self, Relation::Above | Relation::Below)
    }
}

/// A step of a moving shape in a story; `up` is towards the top of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Up,
    Down,
    Left,
    Right,
}

impl Direction {
    pub const ALL: [Direction; 4] = [
        Direction::Up,
        Direction::Down,
        Direction::Left,
        Direction::Right,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Left => "left",
            Direction::Right => "right",
        }
    }

    pub fn from_word(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.word() == word)
    }
}

// ---------------------------------------------------------------------------------------
// Scenes, layouts and captions
// ---------------------------------------------------------------------------------------

/// One coloured shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub colour: Colour,
    pub kind: ShapeKind,
}

impl Shape {
    /// `red circle`.
    pub fn words(self) -> String {
        format!("{} {}", self.colour.word(), self.kind.word())
    }
}

/// What a caption says: `subject relation object`. Positions live in [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scene {
    pub subject: Shape,
    pub relation: Relation,
    pub object: Shape,
}

impl Scene {
    /// The same fact told from the object's side: `a blue square below a red circle` for
    /// `a red circle above a blue square`.
    pub fn converse(&self) -> Scene {
        Scene {
            subject: self.object,
            relation: self.relation.opposite(),
            object: self.subject,
        }
    }

    /// Whether both scenes state the same fact (equal, or each other's converse).
    pub fn same_meaning(&self, other: &Scene) -> bool {
        self == other || self.converse() == *other
    }
}

/// Side of the square grid that layouts are expressed in; [`render`] scales it to the image
/// size, so one layout renders identically (up to scale) at any resolution.
pub const GRID: u32 = 64;

/// Every shape fits in a box of ±`SHAPE_EXTENT` grid units around its centre.
pub const SHAPE_EXTENT: u32 = 10;

/// Ranges (inclusive, grid units) of the centres. Along the relation's axis one shape sits
/// in `NEAR` and the other in `FAR`, at least 24 units apart (two extents plus a gap of 4),
/// so the shapes never overlap. Across it, centres differ by at most 20 units (stories
/// included), fewer than the 24 along it, so the relation's axis always dominates.
const NEAR: (u32, u32) = (14, 20);
const FAR: (u32, u32) = (44, 50);
const ACROSS: (u32, u32) = (24, 40);
/// Range a moving story shape bounces within, and its step per frame.
const STORY_ACROSS: (u32, u32) = (20, 44);
const STORY_STEP: u32 = 4;

/// A centre in grid units; `y` grows downwards as in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Point {
    pub x: u32,
    pub y: u32,
}

/// A scene with its shapes placed: everything [`render`] needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub scene: Scene,
    pub subject_at: Point,
    pub object_at: Point,
}

impl Layout {
    /// Places `scene`'s shapes: on the relation's axis the shape that comes first (top or
    /// left) at `near_far.0` and the other at `near_far.1`; across it the subject at
    /// `across.0` and the object at `across.1`.
    fn place(scene: Scene, near_far: (u32, u32), across: (u32, u32)) -> Layout {
        let (near, far) = near_far;
        let (subject_along, object_along) = match scene.relation {
            Relation::Above | Relation::LeftOf => (near, far),
            Relation::Below | Relation::RightOf => (far, near),
        };
        let at = |along: u32, across: u32| {
            if scene.relation.is_vertical() {
                Point {
                    x: across,
                    y: along,
                }
            } else {
                Point {
                    x: along,
                    y: across,
                }
            }
        };
        Layout {
            scene,
            subject_at: at(subject_along, across.0),
            object_at: at(object_along, across.1),
        }
    }

    /// The relation the positions show: the sign along the dominant axis between the
    /// centres. `None` when neither axis dominates (never for generated layouts).
    pub fn relation_from_positions(&self) -> Option<Relation> {
        let dx = i64::from(self.subject_at.x) - i64::from(self.object_at.x);
        let dy = i64::from(self.subject_at.y) - i64::from(self.object_at.y);
        if dy.abs() > dx.abs() {
            Some(if dy < 0 {
                Relation::Above
            } else {
                Relation::Below
            })
        } else if dx.abs() > dy.abs() {
            Some(if dx < 0 {
                Relation::LeftOf
            } else {
                Relation::RightOf
            })
        } else {
            None
        }
    }
}

/// `phrase` with its indefinite article: `a red circle`, `an orange square`.
fn indefinite(phrase: &str) -> String {
    let vowel = phrase.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {phrase}", if vowel { "an" } else { "a" })
}

/// The caption of a scene, e.g. `a red circle above an orange square`.
pub fn caption(scene: &Scene) -> String {
    format!(
        "{} {} {}",
        indefinite(&scene.subject.words()),
        scene.relation.words(),
        indefinite(&scene.object.words())
    )
}

/// What changed between two consecutive story frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// The subject took one step.
    Moves(Direction),
    /// The subject's colour went from `from` to `to`.
    Turns { from: Colour, to: Colour },
}

/// The caption of a story frame: [`caption`] for the first frame (`change` is `None`),
/// otherwise `the red circle moves up; it is left of the blue square` or
/// `the red circle turns orange; it is left of the blue square`. `scene` is the frame's
/// own scene (after the change).
pub fn story_caption(scene: &Scene, change: Option<Change>) -> String {
    let what = match change {
        None => return caption(scene),
        Some(Change::Moves(d)) => format!("the {} moves {}", scene.subject.words(), d.word()),
        Some(Change::Turns { from, to }) => format!(
            "the {} {} turns {}",
            from.word(),
            scene.subject.kind.word(),
            to.word()
        ),
    };
    format!(
        "{what}; it is {} the {}",
        scene.relation.words(),
        scene.object.words()
    )
}

// ---------------------------------------------------------------------------------------
// Parsing captions back (for tests and the attribute-accuracy metric)
// ---------------------------------------------------------------------------------------

/// Words a generated caption may add without changing what it states.
const FILLER: [&str; 5] = ["a", "an", "the", "is", "to"];

/// Lowercase alphabetic words of `text`, fillers dropped.
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty() && !FILLER.contains(w))
        .map(str::to_string)
        .collect()
}

fn take_shape(words: &[String]) -> Option<(Shape, &[String])> {
    match words {
        [colour, kind, rest @ ..] => Some((
            Shape {
                colour: Colour::from_word(colour)?,
                kind: ShapeKind::from_word(kind)?,
            },
            rest,
        )),
        _ => None,
    }
}

fn take_relation(words: &[String]) -> Option<(Relation, &[String])> {
    match words {
        [w, rest @ ..] if w == "above" => Some((Relation::Above, rest)),
        [w, rest @ ..] if w == "below" => Some((Relation::Below, rest)),
        [w, of, rest @ ..] if w == "left" && of == "of" => Some((Relation::LeftOf, rest)),
        [w, of, rest @ ..] if w == "right" && of == "of" => Some((Relation::RightOf, rest)),
        _ => None,
    }
}

/// Reads a caption of the image grammar back into its [`Scene`]: the inverse of
/// [`caption`]. It is lenient about what does not change the meaning (case, punctuation,
/// extra whitespace, articles, `is`, `to the left of`), so it also reads captions a model
/// generates; anything else (missing or extra words, unknown colours) gives `None`.
pub fn parse_caption(text: &str) -> Option<Scene> {
    let words = words(text);
    let (subject, rest) = take_shape(&words)?;
    let (relation, rest) = take_relation(rest)?;
    let (object, rest) = take_shape(rest)?;
    rest.is_empty().then_some(Scene {
        subject,
        relation,
        object,
    })
}

/// Reads a story frame caption back: the inverse of [`story_caption`], with the same
/// leniency as [`parse_caption`]. Returns the change (`None` for a first-frame caption) and
/// the frame's scene.
pub fn parse_story_caption(text: &str) -> Option<(Option<Change>, Scene)> {
    let Some((event, state)) = text.split_once(';') else {
        return parse_caption(text).map(|scene| (None, scene));
    };
    let event = words(event);
    let (before, rest) = take_shape(&event)?;
    let (change, subject) = match rest {
        [verb, d] if verb == "moves" => (Change::Moves(Direction::from_word(d)?), before),
        [verb, c] if verb == "turns" => {
            let to = Colour::from_word(c)?;
            let change = Change::Turns {
                from: before.colour,
                to,
            };
            (
                change,
                Shape {
                    colour: to,
                    ..before
                },
            )
        }
        _ => return None,
    };
    let state = words(state);
    let rest = state.strip_prefix(&["it".to_string()])?;
    let (relation, rest) = take_relation(rest)?;
    let (object, rest) = take_shape(rest)?;
    rest.is_empty().then_some((
        Some(change),
        Scene {
            subject,
            relation,
            object,
        },
    ))
}

/// The attribute words a caption mentions, in order, whatever its grammar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub colours: Vec<Colour>,
    pub kinds: Vec<ShapeKind>,
    pub relations: Vec<Relation>,
}

/// Collects every colour, shape and relation word of `text` (`left`/`right` count as
/// relations only when followed by `of`, so story directions are not mistaken for them).
pub fn extract_attributes(text: &str) -> Attributes {
    let words = words(text);
    let mut out = Attributes::default();
    for (i, w) in words.iter().enumerate() {
        if let Some(c) = Colour::from_word(w) {
            out.colours.push(c);
        } else if let Some(k) = ShapeKind::from_word(w) {
            out.kinds.push(k);
        } else if let Some((r, _)) = take_relation(&words[i..]) {
            out.relations.push(r);
        }
    }
    out
}

/// Which of the five attributes of a reference [`Scene`] a candidate caption gets right:
/// the input of the "attribute accuracy" metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttributeMatch {
    /// The candidate follows the caption grammar, so attributes are bound to their shapes.
    pub parsed: bool,
    pub subject_colour: bool,
    pub subject_kind: bool,
    pub object_colour: bool,
    pub object_kind: bool,
    pub relation: bool,
}

impl AttributeMatch {
    /// Attributes per scene.
    pub const TOTAL: usize = 5;

    /// Scores `candidate` against `truth`.
    ///
    /// A candidate that parses is compared shape by shape with `truth` and with its
    /// converse (`a blue square below a red circle` is fully right for
    /// `a red circle above a blue square`), keeping the better reading. A candidate that does
    /// not parse (`a red shape and another shape`) gets credit for each true colour and kind
    /// it mentions anywhere, each mention used once, and none for the relation: without the
    /// grammar it is not known which shape a relation word is about.
    pub fn score(candidate: &str, truth: &Scene) -> AttributeMatch {
        if let Some(got) = parse_caption(candidate) {
            let against = |t: &Scene| AttributeMatch {
                parsed: true,
                subject_colour: got.subject.colour == t.subject.colour,
                subject_kind: got.subject.kind == t.subject.kind,
                object_colour: got.object.colour == t.object.colour,
                object_kind: got.object.kind == t.object.kind,
                relation: got.relation == t.relation,
            };
            let (direct, converse) = (against(truth), against(&truth.converse()));
            return if converse.correct() > direct.correct() {
                converse
            } else {
                direct
            };
        }
        let mut seen = extract_attributes(candidate);
        let mut take_colour = |c: Colour| {
            let at = seen.colours.iter().position(|x| *x == c);
            at.map(|i| seen.colours.remove(i)).is_some()
        };
        let (subject_colour, object_colour) = (
            take_colour(truth.subject.colour),
            take_colour(truth.object.colour),
        );
        let mut take_kind = |k: ShapeKind| {
            let at = seen.kinds.iter().position(|x| *x == k);
            at.map(|i| seen.kinds.remove(i)).is_some()
        };
        let (subject_kind, object_kind) =
            (take_kind(truth.subject.kind), take_kind(truth.object.kind));
        AttributeMatch {
            parsed: false,
            subject_colour,
            subject_kind,
            object_colour,
            object_kind,
            relation: false,
        }
    }

    /// Number of attributes right, 0..=5.
    pub fn correct(&self) -> usize {
        [
            self.subject_colour,
            self.subject_kind,
            self.object_colour,
            self.object_kind,
            self.relation,
        ]
        .into_iter()
        .filter(|x| *x)
        .count()
    }

    /// `correct() / TOTAL`.
    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / Self::TOTAL as f64
    }
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// Whether the centre of pixel (`x`, `y`) of a `size`×`size` image lies inside `kind`
/// centred at `at`. Exact integer arithmetic (coordinates scaled by `2 * size * GRID`) so
/// the pixels are the same on every platform.
fn covers(kind: ShapeKind, at: Point, x: u32, y: u32, size: u32) -> bool {
    let q = 2 * i64::from(size);
    let grid = i64::from(GRID);
    // Pixel centre and shape centre in the common scale.
    let (px, py) = ((2 * i64::from(x) + 1) * grid, (2 * i64::from(y) + 1) * grid);
    let (cx, cy) = (i64::from(at.x) * q, i64::from(at.y) * q);
    let e = i64::from(SHAPE_EXTENT) * q;
    let (dx, dy) = (px - cx, py - cy);
    match kind {
        ShapeKind::Circle => dx * dx + dy * dy <= e * e,
        // A little inside the extent so a square does not look bigger than a circle.
        ShapeKind::Square => {
            let half = (i64::from(SHAPE_EXTENT) - 1) * q;
            dx.abs() <= half && dy.abs() <= half
        }
        // Apex up, base at the bottom of the extent, as wide as it is tall.
        ShapeKind::Triangle => dy <= e && 2 * dx.abs() <= dy + e,
    }
}

/// Draws `layout` on a `size`×`size` image: the background, then the two shapes in their
/// flat palette colours (no anti-aliasing: crisp edges keep colours exact for the encoder).
pub fn render(layout: &Layout, size: u32) -> RgbImage {
    let shapes = [
        (layout.scene.subject, layout.subject_at),
        (layout.scene.object, layout.object_at),
    ];
    RgbImage::from_fn(size, size, |x, y| {
        let fill = shapes
            .iter()
            .find(|(shape, at)| covers(shape.kind, *at, x, y, size))
            .map_or(BACKGROUND, |(shape, _)| shape.colour.rgb());
        Rgb(fill)
    })
}

/// [`render`] encoded as the stored JPEG; `what` names the image in errors.
fn render_jpeg(layout: &Layout, size: u32, what: &str) -> Result<Vec<u8>> {
    let img = render(layout, size);
    encode_jpeg(img.as_raw(), size, size, JPEG_QUALITY, false)
        .map_err(|e| Error::Image(format!("synthetic {what}: {e}")))
}

// ---------------------------------------------------------------------------------------
// Random scenes
// ---------------------------------------------------------------------------------------

fn uniform(rng: &mut SplitMix64, (lo, hi): (u32, u32)) -> u32 {
    // The ranges are small constants, so the u64 -> u32 conversion cannot truncate.
    lo + rng.below(u64::from(hi - lo + 1)) as u32
}

/// A uniformly drawn scene whose two shapes have different colours, so each can be named
/// by its colour alone (stories rely on it, and so do the colour-based grounding checks).
fn random_scene(rng: &mut SplitMix64) -> Scene {
    let subject_colour = *rng.choose(&Colour::ALL);
    let others: Vec<Colour> = Colour::ALL
        .into_iter()
        .filter(|c| *c != subject_colour)
        .collect();
    let object_colour = *rng.choose(&others);
    let subject_kind = *rng.choose(&ShapeKind::ALL);
    let object_kind = *rng.choose(&ShapeKind::ALL);
    let relation = *rng.choose(&Relation::ALL);
    Scene {
        subject: Shape {
            colour: subject_colour,
            kind: subject_kind,
        },
        relation,
        object: Shape {
            colour: object_colour,
            kind: object_kind,
        },
    }
}

/// A random scene placed at random (the generator of every training image).
pub fn random_layout(rng: &mut SplitMix64) -> Layout {
    let scene = random_scene(rng);
    let near_far = (uniform(rng, NEAR), uniform(rng, FAR));
    let across = (uniform(rng, ACROSS), uniform(rng, ACROSS));
    Layout::place(scene, near_far, across)
}

/// Draws with `draw` until the result's `key` is not in `avoid`. Rejection keeps val
/// disjoint from train; the world has millions of layouts, so the cap only guards against a
/// pathological config, and the last draw is used when it is reached.
fn draw_avoiding<T, K: Eq + std::hash::Hash>(
    rng: &mut SplitMix64,
    avoid: &HashSet<K>,
    key: impl Fn(&T) -> K,
    mut draw: impl FnMut(&mut SplitMix64) -> T,
) -> T {
    let mut item = draw(rng);
    for _ in 0..100 {
        if !avoid.contains(&key(&item)) {
            break;
        }
        item = draw(rng);
    }
    item
}

// ---------------------------------------------------------------------------------------
// Preference pairs
// ---------------------------------------------------------------------------------------

/// How a rejected caption departs from the true one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Corruption {
    /// One shape gets a colour that is in neither shape.
    Colour,
    /// One shape gets another kind.
    Shape,
    /// The relation is negated (`above` -> `below`) or subject and object are swapped.
    Relation,
    /// True but vaguer: attributes or the relation left out (`two shapes`,
    /// `a red shape and another shape`, `a red circle and a blue square`).
    Vague,
}

impl Corruption {
    pub const ALL: [Corruption; 4] = [
        Corruption::Colour,
        Corruption::Shape,
        Corruption::Relation,
        Corruption::Vague,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Corruption::Colour => "colour",
            Corruption::Shape => "shape",
            Corruption::Relation => "relation",
            Corruption::Vague => "vague",
        }
    }
}

/// A caption of `scene` spoiled by `kind`; never equal to `caption(scene)`, and never
/// stating the same fact. `rng` picks which shape, which wrong value, which template.
pub fn corrupt(scene: &Scene, kind: Corruption, rng: &mut SplitMix64) -> String {
    let (s, o) = (scene.subject, scene.object);
    match kind {
        Corruption::Colour => {
            let wrong: Vec<Colour> = Colour::ALL
                .into_iter()
                .filter(|c| *c != s.colour && *c != o.colour)
                .collect();
            let colour = *rng.choose(&wrong);
            let mut bad = *scene;
            if rng.below(2) == 0 {
                bad.subject.colour = colour;
            } else {
                bad.object.colour = colour;
            }
            caption(&bad)
        }
        Corruption::Shape => {
            let mut bad = *scene;
            let target = if rng.below(2) == 0 {
                &mut bad.subject
            } else {
                &mut bad.object
            };
            let wrong: Vec<ShapeKind> = ShapeKind::ALL
                .into_iter()
                .filter(|k| *k != target.kind)
                .collect();
            target.kind = *rng.choose(&wrong);
            caption(&bad)
        }
        Corruption::Relation => {
            let bad = if rng.below(2) == 0 {
                Scene {
                    relation: scene.relation.opposite(),
                    ..*scene
                }
            } else {
                Scene {
                    subject: o,
                    object: s,
                    ..*scene
                }
            };
            caption(&bad)
        }
        Corruption::Vague => match rng.below(5) {
            0 => "two shapes".to_string(),
            1 => format!(
                "{} and another shape",
                indefinite(&format!("{} shape", s.colour.word()))
            ),
            2 => format!("{} and {}", indefinite(&s.words()), indefinite(&o.words())),
            3 => format!(
                "{} {} {}",
                indefinite(s.kind.word()),
                scene.relation.words(),
                indefinite(o.kind.word())
            ),
            _ => format!(
                "{} {} {}",
                indefinite(&format!("{} shape", s.colour.word())),
                scene.relation.words(),
                indefinite(&format!("{} shape", o.colour.word()))
            ),
        },
    }
}

/// `pairs_per_image` pairs about one image. Each pair of an image uses a different
/// corruption kind (in an order shuffled per image, cycling when there are more than four),
/// and a rejected caption is not repeated for the same image while another can be drawn.
///
/// The prompt is empty: the image is the prompt, identified by `image_key`. Scores are
/// labels, not ratings: `score_chosen = 1.0` (the caption is true of the image and complete)
/// and `score_rejected = 0.0` (wrong or vaguer).
fn pairs_for_image(
    key: &str,
    scene: &Scene,
    pairs_per_image: usize,
    rng: &mut SplitMix64,
) -> Vec<PreferencePair> {
    let chosen = caption(scene);
    let mut kinds = Corruption::ALL;
    rng.shuffle(&mut kinds);
    let mut used = BTreeSet::new();
    (0..pairs_per_image)
        .map(|j| {
            let kind = kinds[j % kinds.len()];
            let mut rejected = corrupt(scene, kind, rng);
            for _ in 0..16 {
                if !used.contains(&rejected) {
                    break;
                }
                rejected = corrupt(scene, kind, rng);
            }
            used.insert(rejected.clone());
            PreferencePair {
                pair_id: format!("{key}-p{j}"),
                source: format!("synthetic:{}", kind.as_str()),
                prompt: String::new(),
                chosen: chosen.clone(),
                rejected,
                score_chosen: 1.0,
                score_rejected: 0.0,
                image_key: Some(key.to_string()),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Stories
// ---------------------------------------------------------------------------------------

/// One drawn story: its first layout (what val compares with train) and every frame's
/// layout with what changed since the previous frame.
struct DrawnStory {
    start: Layout,
    frames: Vec<(Layout, Option<Change>)>,
}

/// A story of `frames` frames (at least one).
fn random_story(rng: &mut SplitMix64, frames: usize) -> DrawnStory {
    let scene = random_scene(rng);
    let near_far = (uniform(rng, NEAR), uniform(rng, FAR));
    let positions = (STORY_ACROSS.1 - STORY_ACROSS.0) / STORY_STEP + 1;
    let start = STORY_ACROSS.0 + STORY_STEP * uniform(rng, (0, positions - 1));
    let mut layout = Layout::place(scene, near_far, (start, uniform(rng, ACROSS)));
    let first = layout;
    // Two in three stories move, the rest change colour: motion is the harder thing to
    // ground, so it gets the larger share.
    let moves = rng.below(3) < 2;
    let mut forward = rng.below(2) == 0;
    let mut out = vec![(layout, None)];
    for _ in 1..frames {
        let change = if moves {
            let vertical = layout.scene.relation.is_vertical();
            let across = if vertical {
                &mut layout.subject_at.x
            } else {
                &mut layout.subject_at.y
            };
            // Bounce: a step that would leave the range goes the other way instead.
            if (forward && *across + STORY_STEP > STORY_ACROSS.1)
                || (!forward && *across < STORY_ACROSS.0 + STORY_STEP)
            {
                forward = !forward;
            }
            if forward {
                *across += STORY_STEP;
            } else {
                *across -= STORY_STEP;
            }
            Change::Moves(match (vertical, forward) {
                (true, true) => Direction::Right,
                (true, false) => Direction::Left,
                (false, true) => Direction::Down,
                (false, false) => Direction::Up,
            })
        } else {
            let from = layout.scene.subject.colour;
            let to = from.next_in_cycle(layout.scene.object.colour);
            layout.scene.subject.colour = to;
            Change::Turns { from, to }
        };
        out.push((layout, Some(change)));
    }
    DrawnStory {
        start: first,
        frames: out,
    }
}

// ---------------------------------------------------------------------------------------
// The ingest source
// ---------------------------------------------------------------------------------------

/// An image to write: its key and layout.
struct PlannedImage {
    key: String,
    layout: Layout,
}

/// A story frame to write.
struct PlannedFrame {
    story_id: String,
    frame_index: i32,
    frame_count: i32,
    layout: Layout,
    caption: String,
}

fn validate(cfg: &SyntheticConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("ingest.synthetic.{m}")));
    if cfg.shard_size == 0 {
        return bad("shard_size must be at least 1".into());
    }
    if cfg.image_size < MIN_IMAGE_SIZE {
        return bad(format!(
            "image_size is {}, but shapes are not recognisable below {MIN_IMAGE_SIZE} pixels",
            cfg.image_size
        ));
    }
    let stories = cfg.train_stories + cfg.val_stories;
    if stories > 0 && cfg.frames_per_story == 0 {
        return bad("frames_per_story must be at least 1 when stories are requested".into());
    }
    if i32::try_from(cfg.frames_per_story).is_err() {
        return bad(format!(
            "frames_per_story is {}, more than a frame index can hold",
            cfg.frames_per_story
        ));
    }
    Ok(())
}

fn plan_images(seed: u64, split: &str, count: usize, avoid: &HashSet<Layout>) -> Vec<PlannedImage> {
    let mut rng = SplitMix64::derived(seed, &format!("images/{split}"));
    (0..count)
        .map(|i| PlannedImage {
            key: format!("syn-{split}-{i:06}"),
            layout: draw_avoiding(&mut rng, avoid, |l: &Layout| *l, random_layout),
        })
        .collect()
}

fn plan_pairs(
    seed: u64,
    split: &str,
    images: &[PlannedImage],
    per_image: usize,
) -> Vec<PreferencePair> {
    let mut rng = SplitMix64::derived(seed, &format!("pairs/{split}"));
    images
        .iter()
        .flat_map(|img| pairs_for_image(&img.key, &img.layout.scene, per_image, &mut rng))
        .collect()
}

/// Stories of `split`, flattened to frames, with their first layouts (so val can avoid
/// train's: two stories that start alike are too alike to sit on both sides of the split).
fn plan_stories(
    seed: u64,
    split: &str,
    count: usize,
    frames: usize,
    avoid: &HashSet<Layout>,
) -> (Vec<PlannedFrame>, HashSet<Layout>) {
    let mut rng = SplitMix64::derived(seed, &format!("stories/{split}"));
    // `validate` has checked that frame indices fit in i32.
    let frame_count = i32::try_from(frames).unwrap_or(i32::MAX);
    let mut starts = HashSet::new();
    let mut out = Vec::with_capacity(count * frames);
    for s in 0..count {
        let story = draw_avoiding(
            &mut rng,
            avoid,
            |d: &DrawnStory| d.start,
            |r| random_story(r, frames),
        );
        starts.insert(story.start);
        let story_id = format!("syn-story-{split}-{s:04}");
        for (i, (layout, change)) in story.frames.into_iter().enumerate() {
            out.push(PlannedFrame {
                story_id: story_id.clone(),
                frame_index: i32::try_from(i).unwrap_or(i32::MAX),
                frame_count,
                caption: story_caption(&layout.scene, change),
                layout,
            });
        }
    }
    (out, starts)
}

/// Writes the shards of one split, reusing finished ones. A finished shard is reused
/// only if its stats show the same row count and seed as planned: a run with another seed
/// or size in the same workdir regenerates instead of mixing worlds. Finished shards past
/// the planned ones (left by a larger earlier config) are removed so `read_all` sees
/// exactly this config's rows.
struct SplitWriter<'a> {
    workdir: &'a Path,
    shard_size: usize,
    source: String,
    progress: &'a Progress,
}

impl SplitWriter<'_> {
    fn write<T, R: Record>(
        &self,
        dataset: &str,
        split: &str,
        items: &[T],
        counts_as_images: bool,
        build: impl Fn(&T) -> Result<R>,
    ) -> Result<SplitSummary> {
        let set = ShardSet::new(self.workdir, dataset, split);
        set.prepare()?;
        let finished: BTreeSet<u32> = set.finished()?.into_iter().collect();
        let mut summary = SplitSummary {
            dataset: dataset.to_string(),
            split: split.to_string(),
            ..SplitSummary::default()
        };
        let mut planned = 0u32;
        for (i, chunk) in items.chunks(self.shard_size).enumerate() {
            let shard = u32::try_from(i).map_err(|_| {
                Error::Config(format!(
                    "ingest.synthetic: {dataset}/{split} needs more than {} shards; raise shard_size",
                    u32::MAX
                ))
            })?;
            planned = shard + 1;
            let count = chunk.len() as u64;
            let reusable = finished.contains(&shard)
                && set
                    .read_stats(shard)
                    .is_ok_and(|s| s.count == count && s.source == self.source);
            if reusable {
                summary.shards_skipped += 1;
                if counts_as_images {
                    self.progress.inc(count);
                }
            } else {
                let start = Instant::now();
                let mut rows = Vec::with_capacity(chunk.len());
                for item in chunk {
                    rows.push(build(item)?);
                    if counts_as_images {
                        self.progress.inc(1);
                    }
                }
                let stats = ShardStats {
                    shard,
                    count,
                    successes: count,
                    failures: BTreeMap::new(),
                    duration_secs: start.elapsed().as_secs_f64(),
                    source: self.source.clone(),
                };
                set.write(shard, &rows, &stats)?;
                summary.shards_written += 1;
            }
            summary.rows += count;
        }
        for &stale in finished.range(planned..) {
            // Stats first: without them the shard stops counting as finished at once.
            let stats = set.stats_path(stale);
            fs::remove_file(&stats).at(&stats)?;
            let parquet = set.parquet_path(stale);
            fs::remove_file(&parquet).at(&parquet)?;
        }
        Ok(summary)
    }
}

/// Generates the synthetic world for `seed` into `workdir` (see the module docs for the
/// files and the caption grammar) and returns what each split holds.
///
/// Same `(cfg, seed)` gives byte-identical Parquet files: every choice comes from
/// [`SplitMix64`] streams derived from `seed` and a label (`images/train`, `images/val`,
/// `pairs/<split>`, `stories/<split>`), and rendering uses integer arithmetic only. Val is
/// drawn from its own streams and rejects any layout (and story start) that train has, so
/// it is held out. Preference pairs have an empty prompt (the image, `image_key`, is the
/// prompt) and scores 1.0 (chosen, the true caption) / 0.0 (rejected, a corrupted or vaguer
/// one); their `source` is `synthetic:<corruption>`.
/// The shards' provenance: the seed and a digest of every setting, so that a finished shard
/// is reused only when the same `(cfg, seed)` would write it again (image size, pairs per
/// image, or the train set that val avoids, all change shards of the same count).
fn source_of(cfg: &SyntheticConfig, seed: u64) -> String {
    let settings = serde_json::to_vec(cfg).expect("the synthetic config serialises");
    let digest = hex::encode(Sha256::digest(settings));
    format!("synthetic seed={seed} config-sha256={}", &digest[..16])
}

pub fn run(cfg: &SyntheticConfig, seed: u64, workdir: &Path) -> Result<SourceSummary> {
    validate(cfg)?;
    let size = cfg.image_size;

    // Plan everything first (cheap); only shards that need writing are rendered.
    let train_images = plan_images(seed, "train", cfg.train_images, &HashSet::new());
    let train_layouts: HashSet<Layout> = train_images.iter().map(|i| i.layout).collect();
    let val_images = plan_images(seed, "val", cfg.val_images, &train_layouts);
    let (train_frames, train_starts) = plan_stories(
        seed,
        "train",
        cfg.train_stories,
        cfg.frames_per_story,
        &HashSet::new(),
    );
    let (val_frames, _) = plan_stories(
        seed,
        "val",
        cfg.val_stories,
        cfg.frames_per_story,
        &train_starts,
    );

    let total = (cfg.train_images + cfg.val_images + train_frames.len() + val_frames.len()) as u64;
    let progress = Progress::new("synthetic", "images", Some(total));
    let writer = SplitWriter {
        workdir,
        shard_size: cfg.shard_size,
        source: source_of(cfg, seed),
        progress: &progress,
    };

    let mut splits = Vec::new();
    for (split, images) in [("train", &train_images), ("val", &val_images)] {
        splits.push(writer.write(IMAGES_DATASET, split, images, true, |img| {
            image_row(img, split, size)
        })?);
    }
    for (split, images) in [("train", &train_images), ("val", &val_images)] {
        let pairs = plan_pairs(seed, split, images, cfg.pairs_per_image);
        splits.push(writer.write(PAIRS_DATASET, split, &pairs, false, |p| Ok(p.clone()))?);
    }
    for (split, frames) in [("train", &train_frames), ("val", &val_frames)] {
        splits.push(writer.write(STORIES_DATASET, split, frames, true, |f| {
            Ok(StoryFrame {
                story_id: f.story_id.clone(),
                frame_index: f.frame_index,
                frame_count: f.frame_count,
                image: render_jpeg(
                    &f.layout,
                    size,
                    &format!("{} frame {}", f.story_id, f.frame_index),
                )?,
                caption: f.caption.clone(),
            })
        })?);
    }

    let written: usize = splits.iter().map(|s| s.shards_written).sum();
    let skipped: usize = splits.iter().map(|s| s.shards_skipped).sum();
    progress.finish(&format!(
        "({written} shards written, {skipped} already finished)"
    ));
    Ok(SourceSummary {
        source: "synthetic".to_string(),
        splits,
    })
}

fn image_row(img: &PlannedImage, split: &str, size: u32) -> Result<ImageTextSample> {
    let jpeg = render_jpeg(&img.layout, size, &img.key)?;
    Ok(ImageTextSample {
        key: img.key.clone(),
        url: format!("synthetic://{split}/{}", img.key),
        caption: caption(&img.layout.scene),
        status: SampleStatus::Success,
        error: None,
        width: Some(size),
        height: Some(size),
        original_width: Some(size),
        original_height: Some(size),
        sha256: Some(hex::encode(Sha256::digest(&jpeg))),
        image: Some(jpeg),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;

    fn small_cfg() -> SyntheticConfig {
        SyntheticConfig {
            train_images: 10,
            val_images: 6,
            image_size: 64,
            shard_size: 4,
            pairs_per_image: 2,
            train_stories: 3,
            val_stories: 2,
            frames_per_story: 5,
        }
    }

    fn scene(sc: Colour, sk: ShapeKind, relation: Relation, oc: Colour, ok: ShapeKind) -> Scene {
        Scene {
            subject: Shape {
                colour: sc,
                kind: sk,
            },
            relation,
            object: Shape {
                colour: oc,
                kind: ok,
            },
        }
    }

    fn red_circle_above_blue_square() -> Scene {
        scene(
            Colour::Red,
            ShapeKind::Circle,
            Relation::Above,
            Colour::Blue,
            ShapeKind::Square,
        )
    }

    fn all_scenes() -> Vec<Scene> {
        let mut out = Vec::new();
        for sc in Colour::ALL {
            for oc in Colour::ALL {
                for sk in ShapeKind::ALL {
                    for ok in ShapeKind::ALL {
                        for r in Relation::ALL {
                            out.push(scene(sc, sk, r, oc, ok));
                        }
                    }
                }
            }
        }
        out
    }

    /// Every Parquet file under `root`, by path relative to it.
    fn parquet_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, root, out);
                } else if path.extension().is_some_and(|e| e == "parquet") {
                    let rel = path.strip_prefix(root).unwrap().to_path_buf();
                    out.insert(rel, fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    /// Pixels of one palette colour in an image.
    #[derive(Debug, Default, Clone, Copy)]
    struct Blob {
        count: u64,
        sum_x: u64,
        sum_y: u64,
        min: (u32, u32),
        max: (u32, u32),
    }

    impl Blob {
        fn centroid(&self) -> (f64, f64) {
            let n = self.count as f64;
            (self.sum_x as f64 / n, self.sum_y as f64 / n)
        }

        /// Share of the bounding box the blob fills: ~1 square, ~0.79 circle, ~0.5 triangle.
        fn fill(&self) -> f64 {
            let w = f64::from(self.max.0 - self.min.0 + 1);
            let h = f64::from(self.max.1 - self.min.1 + 1);
            self.count as f64 / (w * h)
        }
    }

    /// Pixels within 35 (RGB distance) of each palette colour: half the smallest distance
    /// between two palette entries, so no pixel counts for two colours.
    fn colour_blobs(img: &RgbImage) -> BTreeMap<Colour, Blob> {
        let mut out: BTreeMap<Colour, Blob> = BTreeMap::new();
        for (x, y, p) in img.enumerate_pixels() {
            for c in Colour::ALL {
                let d: i64 = c
                    .rgb()
                    .iter()
                    .zip(p.0)
                    .map(|(a, b)| (i64::from(*a) - i64::from(b)).pow(2))
                    .sum();
                if d <= 35 * 35 {
                    let b = out.entry(c).or_insert(Blob {
                        min: (u32::MAX, u32::MAX),
                        ..Blob::default()
                    });
                    b.count += 1;
                    b.sum_x += u64::from(x);
                    b.sum_y += u64::from(y);
                    b.min = (b.min.0.min(x), b.min.1.min(y));
                    b.max = (b.max.0.max(x), b.max.1.max(y));
                }
            }
        }
        out
    }

    fn decode(jpeg: &[u8]) -> RgbImage {
        image::load_from_memory(jpeg).unwrap().into_rgb8()
    }

    /// Checks that `img` shows exactly `scene`: both named colours in sizeable blobs, no
    /// other palette colour, each blob's fill ratio matching its kind, and the centroids in
    /// the stated relation. Returns the blobs for further checks.
    fn assert_grounded(img: &RgbImage, scene: &Scene, what: &str) -> BTreeMap<Colour, Blob> {
        let blobs = colour_blobs(img);
        let min_pixels = u64::from(img.width() * img.height()) / 40;
        for shape in [scene.subject, scene.object] {
            let blob = blobs.get(&shape.colour);
            let blob = blob.unwrap_or_else(|| panic!("{what}: no {} pixels", shape.words()));
            assert!(
                blob.count >= min_pixels,
                "{what}: {} is only {blob:?}",
                shape.words()
            );
            let fill = blob.fill();
            let fits = match shape.kind {
                ShapeKind::Square => fill > 0.9,
                ShapeKind::Circle => (0.68..0.9).contains(&fill),
                ShapeKind::Triangle => fill < 0.62,
            };
            assert!(fits, "{what}: {} fills {fill:.2} of its box", shape.words());
        }
        for (c, blob) in &blobs {
            if *c != scene.subject.colour && *c != scene.object.colour {
                assert!(
                    blob.count <= 4,
                    "{what}: stray {} pixels {blob:?}",
                    c.word()
                );
            }
        }
        let (sx, sy) = blobs[&scene.subject.colour].centroid();
        let (ox, oy) = blobs[&scene.object.colour].centroid();
        let (dx, dy) = (sx - ox, sy - oy);
        let seen = if dy.abs() > dx.abs() {
            if dy < 0.0 {
                Relation::Above
            } else {
                Relation::Below
            }
        } else if dx < 0.0 {
            Relation::LeftOf
        } else {
            Relation::RightOf
        };
        assert_eq!(
            seen, scene.relation,
            "{what}: centroids differ by ({dx:.1}, {dy:.1})"
        );
        blobs
    }

    #[test]
    fn every_caption_parses_back_to_its_scene() {
        for s in all_scenes() {
            let text = caption(&s);
            assert_eq!(parse_caption(&text), Some(s), "{text}");
            assert_eq!(text, text.to_lowercase());
        }
        assert_eq!(
            caption(&red_circle_above_blue_square()),
            "a red circle above a blue square"
        );
        let orange = scene(
            Colour::Orange,
            ShapeKind::Triangle,
            Relation::RightOf,
            Colour::Orange,
            ShapeKind::Circle,
        );
        assert_eq!(
            caption(&orange),
            "an orange triangle right of an orange circle"
        );
    }

    #[test]
    fn parse_caption_forgives_form_but_not_content() {
        let want = Some(scene(
            Colour::Red,
            ShapeKind::Circle,
            Relation::LeftOf,
            Colour::Blue,
            ShapeKind::Square,
        ));
        assert_eq!(
            parse_caption("A red circle is to the left of a blue square."),
            want
        );
        assert_eq!(parse_caption("  red circle left of  blue square "), want);
        assert_eq!(parse_caption("an red circle left of an blue square"), want);
        for bad in [
            "",
            "two shapes",
            "a red circle near a blue square",
            "a red circle left a blue square",
            "a red circle above a blue square and a green triangle",
            "a pink circle above a blue square",
            "a red shape above a blue shape",
        ] {
            assert_eq!(parse_caption(bad), None, "{bad}");
        }
    }

    #[test]
    fn story_captions_parse_back_to_change_and_scene() {
        let mut rng = SplitMix64::new(11);
        let mut changes = HashSet::new();
        for _ in 0..300 {
            let story = random_story(&mut rng, 8);
            for (layout, change) in story.frames {
                let text = story_caption(&layout.scene, change);
                assert_eq!(
                    parse_story_caption(&text),
                    Some((change, layout.scene)),
                    "{text}"
                );
                changes.insert(match change {
                    None => "first",
                    Some(Change::Moves(_)) => "moves",
                    Some(Change::Turns { .. }) => "turns",
                });
            }
        }
        assert_eq!(
            changes.len(),
            3,
            "first frames, moves and colour turns all occur"
        );
        let s = red_circle_above_blue_square();
        assert_eq!(
            story_caption(&s, Some(Change::Moves(Direction::Left))),
            "the red circle moves left; it is above the blue square"
        );
        let turned = scene(
            Colour::Orange,
            ShapeKind::Circle,
            Relation::Above,
            Colour::Blue,
            ShapeKind::Square,
        );
        let change = Change::Turns {
            from: Colour::Red,
            to: Colour::Orange,
        };
        let text = story_caption(&turned, Some(change));
        assert_eq!(
            text,
            "the red circle turns orange; it is above the blue square"
        );
        assert_eq!(parse_story_caption(&text), Some((Some(change), turned)));
    }

    #[test]
    fn layouts_show_their_relation_and_shapes_never_touch_or_leave_the_image() {
        let mut rng = SplitMix64::new(5);
        let mut layouts: Vec<Layout> = (0..300).map(|_| random_layout(&mut rng)).collect();
        for _ in 0..60 {
            layouts.extend(random_story(&mut rng, 9).frames.into_iter().map(|f| f.0));
        }
        for size in [MIN_IMAGE_SIZE, 64] {
            for l in &layouts {
                assert_eq!(l.relation_from_positions(), Some(l.scene.relation), "{l:?}");
                assert_ne!(l.scene.subject.colour, l.scene.object.colour);
                for y in 0..size {
                    for x in 0..size {
                        let s = covers(l.scene.subject.kind, l.subject_at, x, y, size);
                        let o = covers(l.scene.object.kind, l.object_at, x, y, size);
                        assert!(!(s && o), "overlap at ({x}, {y}) in {l:?}");
                        let edge = x == 0 || y == 0 || x == size - 1 || y == size - 1;
                        assert!(!(edge && (s || o)), "shape touches the border: {l:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn rendered_scenes_show_named_colours_kinds_and_relation() {
        // Every scene of the world, through the same JPEG encoding as the stored images.
        let mut rng = SplitMix64::new(3);
        for s in all_scenes() {
            if s.subject.colour == s.object.colour {
                continue;
            }
            let layout = Layout::place(
                s,
                (uniform(&mut rng, NEAR), uniform(&mut rng, FAR)),
                (uniform(&mut rng, ACROSS), uniform(&mut rng, ACROSS)),
            );
            let jpeg = render_jpeg(&layout, 64, "test").unwrap();
            assert_grounded(&decode(&jpeg), &s, &caption(&s));
        }
    }

    #[test]
    fn run_writes_the_documented_files_with_the_configured_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let summary = run(&cfg, 42, tmp.path()).unwrap();
        assert_eq!(summary.source, "synthetic");
        let rows: Vec<(&str, &str, u64)> = summary
            .splits
            .iter()
            .map(|s| (s.dataset.as_str(), s.split.as_str(), s.rows))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("synthetic", "train", 10),
                ("synthetic", "val", 6),
                ("synthetic_prefs", "train", 20),
                ("synthetic_prefs", "val", 12),
                ("synthetic_stories", "train", 15),
                ("synthetic_stories", "val", 10),
            ]
        );
        for s in &summary.splits {
            assert_eq!(
                s.shards_written,
                (s.rows as usize).div_ceil(cfg.shard_size),
                "{s:?}"
            );
            assert_eq!((s.shards_skipped, s.failed), (0, 0), "{s:?}");
            let set = ShardSet::new(tmp.path(), &s.dataset, &s.split);
            for shard in 0..s.shards_written as u32 {
                assert!(set.parquet_path(shard).is_file() && set.stats_path(shard).is_file());
                let stats = set.read_stats(shard).unwrap();
                assert_eq!(stats.source, source_of(&cfg, 42));
                assert!(stats.source.starts_with("synthetic seed=42 config-sha256="));
                assert_eq!(stats.successes, stats.count);
                assert!(stats.failures.is_empty());
            }
        }

        let mut all_keys = HashSet::new();
        for (split, n) in [("train", 10), ("val", 6)] {
            let images: Vec<ImageTextSample> = ShardSet::new(tmp.path(), IMAGES_DATASET, split)
                .read_all()
                .unwrap();
            assert_eq!(images.len(), n);
            let mut captions = BTreeMap::new();
            for (i, img) in images.iter().enumerate() {
                assert_eq!(img.key, format!("syn-{split}-{i:06}"));
                assert!(
                    all_keys.insert(img.key.clone()),
                    "duplicate key {}",
                    img.key
                );
                assert_eq!(img.url, format!("synthetic://{split}/{}", img.key));
                assert_eq!(img.status, SampleStatus::Success);
                assert_eq!(img.error, None);
                assert_eq!((img.width, img.height), (Some(64), Some(64)));
                assert_eq!(
                    (img.original_width, img.original_height),
                    (Some(64), Some(64))
                );
                let jpeg = img.image.as_ref().unwrap();
                assert_eq!(
                    img.sha256.as_deref(),
                    Some(hex::encode(Sha256::digest(jpeg)).as_str())
                );
                let s = parse_caption(&img.caption).unwrap_or_else(|| panic!("{}", img.caption));
                assert_grounded(&decode(jpeg), &s, &img.key);
                captions.insert(img.key.clone(), img.caption.clone());
            }

            let pairs: Vec<PreferencePair> = ShardSet::new(tmp.path(), PAIRS_DATASET, split)
                .read_all()
                .unwrap();
            assert_eq!(pairs.len(), n * cfg.pairs_per_image);
            let ids: HashSet<_> = pairs.iter().map(|p| p.pair_id.clone()).collect();
            assert_eq!(ids.len(), pairs.len(), "pair ids are unique");
            for p in &pairs {
                let key = p.image_key.as_ref().unwrap();
                let chosen = captions
                    .get(key)
                    .unwrap_or_else(|| panic!("{key} not in {split}"));
                assert_eq!(&p.chosen, chosen);
                assert_ne!(p.chosen, p.rejected);
                assert_eq!(p.prompt, "");
                assert_eq!((p.score_chosen, p.score_rejected), (1.0, 0.0));
                let kind = p.source.strip_prefix("synthetic:").unwrap();
                assert!(
                    Corruption::ALL.iter().any(|c| c.as_str() == kind),
                    "{}",
                    p.source
                );
            }

            let frames: Vec<StoryFrame> = ShardSet::new(tmp.path(), STORIES_DATASET, split)
                .read_all()
                .unwrap();
            let stories = if split == "train" { 3 } else { 2 };
            assert_eq!(frames.len(), stories * cfg.frames_per_story);
            for (i, f) in frames.iter().enumerate() {
                let story = i / cfg.frames_per_story;
                assert_eq!(f.story_id, format!("syn-story-{split}-{story:04}"));
                assert_eq!(f.frame_index as usize, i % cfg.frames_per_story);
                assert_eq!(f.frame_count as usize, cfg.frames_per_story);
                let (_, s) = parse_story_caption(&f.caption).unwrap();
                assert_grounded(&decode(&f.image), &s, &f.caption);
            }
        }
    }

    #[test]
    fn story_frames_change_the_way_their_captions_say() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = SyntheticConfig {
            train_images: 0,
            val_images: 0,
            train_stories: 12,
            val_stories: 0,
            frames_per_story: 8,
            ..small_cfg()
        };
        run(&cfg, 9, tmp.path()).unwrap();
        let frames: Vec<StoryFrame> = ShardSet::new(tmp.path(), STORIES_DATASET, "train")
            .read_all()
            .unwrap();
        assert_eq!(frames.len(), 12 * 8);
        let (mut moves, mut turns) = (0, 0);
        for pair in frames.windows(2) {
            let (prev, next) = (&pair[0], &pair[1]);
            if prev.story_id != next.story_id {
                continue;
            }
            let (_, before) = parse_story_caption(&prev.caption).unwrap();
            let (change, after) = parse_story_caption(&next.caption).unwrap();
            let what = &next.caption;
            let b0 = assert_grounded(&decode(&prev.image), &before, &prev.caption);
            let b1 = assert_grounded(&decode(&next.image), &after, what);
            assert_eq!(
                after.object, before.object,
                "{what}: the object keeps its identity"
            );
            assert_eq!(after.relation, before.relation, "{what}");
            let (ox0, oy0) = b0[&before.object.colour].centroid();
            let (ox1, oy1) = b1[&after.object.colour].centroid();
            assert!(
                (ox0 - ox1).abs() < 0.5 && (oy0 - oy1).abs() < 0.5,
                "{what}: object moved"
            );
            match change {
                Some(Change::Moves(d)) => {
                    moves += 1;
                    assert_eq!(after.subject, before.subject, "{what}");
                    let (x0, y0) = b0[&before.subject.colour].centroid();
                    let (x1, y1) = b1[&after.subject.colour].centroid();
                    let (dx, dy) = (x1 - x0, y1 - y0);
                    let step = f64::from(STORY_STEP);
                    let (along, across) = match d {
                        Direction::Up => (-dy, dx),
                        Direction::Down => (dy, dx),
                        Direction::Left => (-dx, dy),
                        Direction::Right => (dx, dy),
                    };
                    assert!(
                        (along - step).abs() < 1.0 && across.abs() < 0.5,
                        "{what}: {dx} {dy}"
                    );
                }
                Some(Change::Turns { from, to }) => {
                    turns += 1;
                    assert_eq!(from, before.subject.colour, "{what}");
                    assert_eq!(to, before.subject.colour.next_in_cycle(after.object.colour));
                    assert_eq!(after.subject.kind, before.subject.kind, "{what}");
                    assert!(!b1.contains_key(&from) || b1[&from].count <= 4, "{what}");
                }
                None => panic!(
                    "frame {} of {} has a first-frame caption",
                    next.frame_index, next.story_id
                ),
            }
        }
        assert!(
            moves > 0 && turns > 0,
            "{moves} moves, {turns} colour turns"
        );
    }

    #[test]
    fn same_seed_gives_byte_identical_parquet_and_another_seed_does_not() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let cfg = small_cfg();
        run(&cfg, 7, a.path()).unwrap();
        run(&cfg, 7, b.path()).unwrap();
        run(&cfg, 8, c.path()).unwrap();
        let (fa, fb, fc) = (
            parquet_files(a.path()),
            parquet_files(b.path()),
            parquet_files(c.path()),
        );
        // Shards of 4 rows: images 3 + 2, pairs 5 + 3, story frames 4 + 3.
        assert_eq!(fa.len(), 20);
        assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
        for (path, bytes) in &fa {
            assert!(
                bytes == &fb[path],
                "{} differs between runs",
                path.display()
            );
        }
        assert!(
            fa.iter().any(|(path, bytes)| bytes != &fc[path]),
            "seed is ignored"
        );
    }

    #[test]
    fn rerun_skips_finished_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let first = run(&cfg, 1, tmp.path()).unwrap();
        let before = parquet_files(tmp.path());
        let second = run(&cfg, 1, tmp.path()).unwrap();
        for (a, b) in first.splits.iter().zip(&second.splits) {
            assert_eq!(b.shards_written, 0, "{b:?}");
            assert_eq!(b.shards_skipped, a.shards_written, "{b:?}");
            assert_eq!(b.rows, a.rows, "{b:?}");
        }
        assert_eq!(parquet_files(tmp.path()), before);

        // A shard killed before its stats were written is redone, alone.
        let set = ShardSet::new(tmp.path(), IMAGES_DATASET, "val");
        fs::remove_file(set.stats_path(1)).unwrap();
        let third = run(&cfg, 1, tmp.path()).unwrap();
        let written: usize = third.splits.iter().map(|s| s.shards_written).sum();
        assert_eq!(written, 1);
        assert_eq!(parquet_files(tmp.path()), before);
    }

    #[test]
    fn another_seed_or_smaller_config_replaces_stale_shards() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        run(&cfg, 1, tmp.path()).unwrap();
        let summary = run(&cfg, 2, tmp.path()).unwrap();
        assert!(
            summary.splits.iter().all(|s| s.shards_skipped == 0),
            "{summary:?}"
        );
        run(&cfg, 2, fresh.path()).unwrap();
        assert_eq!(parquet_files(tmp.path()), parquet_files(fresh.path()));

        let smaller = SyntheticConfig {
            train_images: 3,
            ..cfg
        };
        let summary = run(&smaller, 2, tmp.path()).unwrap();
        assert_eq!(summary.splits[0].rows, 3);
        let set = ShardSet::new(tmp.path(), IMAGES_DATASET, "train");
        assert_eq!(set.finished().unwrap(), vec![0]);
        assert_eq!(set.read_all::<ImageTextSample>().unwrap().len(), 3);

        // A setting that keeps every shard's row count (the image size) still redoes them.
        let larger_images = SyntheticConfig {
            image_size: smaller.image_size * 2,
            ..smaller.clone()
        };
        let summary = run(&larger_images, 2, tmp.path()).unwrap();
        assert!(
            summary.splits.iter().all(|s| s.shards_skipped == 0),
            "{summary:?}"
        );
        run(&larger_images, 2, fresh.path()).unwrap();
        assert_eq!(parquet_files(tmp.path()), parquet_files(fresh.path()));
    }

    #[test]
    fn val_is_drawn_apart_from_train() {
        let train = plan_images(4, "train", 3000, &HashSet::new());
        let train_layouts: HashSet<Layout> = train.iter().map(|i| i.layout).collect();
        let val = plan_images(4, "val", 800, &train_layouts);
        assert!(val.iter().all(|v| !train_layouts.contains(&v.layout)));
        // The rejection really redraws: a set holding the first draw forces a second.
        let first = random_layout(&mut SplitMix64::new(1));
        let avoid = HashSet::from([first]);
        let drawn = draw_avoiding(
            &mut SplitMix64::new(1),
            &avoid,
            |l: &Layout| *l,
            random_layout,
        );
        assert_ne!(drawn, first);

        let (_, starts) = plan_stories(4, "train", 200, 3, &HashSet::new());
        let (val_frames, val_starts) = plan_stories(4, "val", 100, 3, &starts);
        assert!(val_starts.is_disjoint(&starts));
        assert_eq!(val_frames.len(), 300);
    }

    #[test]
    fn corruptions_are_wrong_or_vaguer_and_every_kind_is_used() {
        let mut rng = SplitMix64::new(2);
        for s in all_scenes()
            .into_iter()
            .filter(|s| s.subject.colour != s.object.colour)
        {
            for kind in Corruption::ALL {
                for _ in 0..3 {
                    let bad = corrupt(&s, kind, &mut rng);
                    assert_ne!(bad, caption(&s));
                    let parsed = parse_caption(&bad);
                    match kind {
                        Corruption::Vague => assert_eq!(parsed, None, "{bad}"),
                        _ => assert!(!parsed.unwrap().same_meaning(&s), "{bad} for {s:?}"),
                    }
                    assert!(AttributeMatch::score(&bad, &s).correct() < AttributeMatch::TOTAL);
                }
            }
        }
        let mut kinds = BTreeMap::new();
        let s = red_circle_above_blue_square();
        for i in 0..100 {
            let pairs = pairs_for_image(&format!("k{i}"), &s, 2, &mut rng);
            assert_ne!(
                pairs[0].source, pairs[1].source,
                "one image's pairs differ in kind"
            );
            for p in pairs {
                *kinds.entry(p.source).or_insert(0) += 1;
            }
        }
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert!(
            kinds.values().all(|n| *n >= 25),
            "kinds are roughly balanced: {kinds:?}"
        );
    }

    #[test]
    fn attribute_match_binds_attributes_to_shapes() {
        let truth = red_circle_above_blue_square();
        let score = |text: &str| AttributeMatch::score(text, &truth);
        assert_eq!(score("a red circle above a blue square").correct(), 5);
        assert_eq!(score("A blue square below a red circle.").correct(), 5);
        assert_eq!(score("a blue circle above a red square").correct(), 3);
        assert_eq!(score("a red circle below a blue square").correct(), 4);
        let loose = score("a red circle and a blue square");
        assert!(!loose.parsed);
        assert_eq!(loose.correct(), 4);
        assert_eq!(score("a red shape and another shape").correct(), 1);
        assert_eq!(score("two shapes").correct(), 0);
        // Right subject and relation; the object's colour and kind are both wrong.
        assert_eq!(score("a red circle above a red circle").correct(), 3);
        assert!((score("a red circle above a blue square").accuracy() - 1.0).abs() < 1e-12);
        let attrs = extract_attributes("the red circle moves left; it is right of the blue square");
        assert_eq!(attrs.relations, vec![Relation::RightOf]);
        assert_eq!(attrs.colours, vec![Colour::Red, Colour::Blue]);
    }

    #[test]
    fn invalid_configs_are_refused_naming_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        for (cfg, key) in [
            (
                SyntheticConfig {
                    shard_size: 0,
                    ..small_cfg()
                },
                "shard_size",
            ),
            (
                SyntheticConfig {
                    image_size: 8,
                    ..small_cfg()
                },
                "image_size",
            ),
            (
                SyntheticConfig {
                    frames_per_story: 0,
                    ..small_cfg()
                },
                "frames_per_story",
            ),
        ] {
            let err = run(&cfg, 1, tmp.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("ingest.synthetic.{key}")), "{err}");
        }
    }

    #[test]
    fn defaults_mirror_configs_default_toml() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
        let text = fs::read_to_string(&path).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let table = doc["ingest"]["synthetic"].clone();
        let from_file: SyntheticConfig = table.try_into().unwrap();
        assert_eq!(
            serde_json::to_value(from_file).unwrap(),
            serde_json::to_value(SyntheticConfig::default()).unwrap()
        );
    }
}
