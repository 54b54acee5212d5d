//! The embedded synthetic world: deterministic images of coloured shapes with grounded
//! captions, preference pairs and short stories; the caption grammar, its parser, rendering,
//! corruptions and the world's sentences (the tiny tokenizers' corpus). The ingest stage
//! writes it as shards with the same schemas as the real sources
//! (`stages::ingest::synthetic`).
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
//! | `data/synthetic/{train,val}/` | `ImageTextSample`, key `syn-<split>-NNNNNN` |
//! | `data/synthetic_prefs/{train,val}/` | [`PreferencePair`] about the same split's images |
//! | `data/synthetic_stories/{train,val}/` | `StoryFrame`, story id `syn-story-<split>-NNNN` |

use std::collections::{BTreeSet, HashSet};

use image::{Rgb, RgbImage};

use crate::data::records::PreferencePair;
use crate::error::{Error, Result};
use crate::imaging::resize::encode_jpeg;
use crate::rng::SplitMix64;

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
pub const MIN_IMAGE_SIZE: u32 = 16;

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
pub const STORY_STEP: u32 = 4;

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

/// Next-frame attribute accuracy of a story caption `candidate` against the frame's true
/// caption `truth` ([`story_caption`]): the five scene attributes of [`AttributeMatch`] plus
/// the change (what moved or turned, and how), six in all. A candidate in the image grammar
/// (no change) can get the scene right but not the change; `None` when `truth` is not a
/// story caption.
pub fn story_attribute_accuracy(candidate: &str, truth: &str) -> Option<f64> {
    let (change, scene) = parse_story_caption(truth)?;
    let (got_change, scene_text) = match parse_story_caption(candidate) {
        Some((c, s)) => (c, caption(&s)),
        None => (None, candidate.to_string()),
    };
    let scene_right = AttributeMatch::score(&scene_text, &scene).correct();
    let change_right = usize::from(change.is_some() && got_change == change);
    Some((scene_right + change_right) as f64 / (AttributeMatch::TOTAL + 1) as f64)
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
pub fn render_jpeg(layout: &Layout, size: u32, what: &str) -> Result<Vec<u8>> {
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
pub fn draw_avoiding<T, K: Eq + std::hash::Hash>(
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
pub fn pairs_for_image(
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
pub struct DrawnStory {
    pub start: Layout,
    pub frames: Vec<(Layout, Option<Change>)>,
}

/// A story of `frames` frames (at least one).
pub fn random_story(rng: &mut SplitMix64, frames: usize) -> DrawnStory {
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

/// Every sentence the synthetic world can say (image captions and story captions), in a
/// fixed order: the tokenizer's training corpus.
pub fn corpus() -> Vec<String> {
    let shapes: Vec<Shape> = Colour::ALL
        .iter()
        .flat_map(|&colour| {
            ShapeKind::ALL
                .iter()
                .map(move |&kind| Shape { colour, kind })
        })
        .collect();
    let mut out = Vec::new();
    for &subject in &shapes {
        for &object in &shapes {
            for &relation in &Relation::ALL {
                let scene = Scene {
                    subject,
                    relation,
                    object,
                };
                out.push(caption(&scene));
                for &d in &Direction::ALL {
                    out.push(story_caption(&scene, Some(Change::Moves(d))));
                }
                let from = subject.colour.next_in_cycle(object.colour);
                out.push(story_caption(
                    &scene,
                    Some(Change::Turns {
                        from,
                        to: subject.colour,
                    }),
                ));
            }
        }
    }
    out.push("two shapes".into());
    out.push("a shape and another shape".into());
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    pub(crate) fn scene(
        sc: Colour,
        sk: ShapeKind,
        relation: Relation,
        oc: Colour,
        ok: ShapeKind,
    ) -> Scene {
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

    pub(crate) fn red_circle_above_blue_square() -> Scene {
        scene(
            Colour::Red,
            ShapeKind::Circle,
            Relation::Above,
            Colour::Blue,
            ShapeKind::Square,
        )
    }

    pub(crate) fn all_scenes() -> Vec<Scene> {
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

    /// Pixels of one palette colour in an image.
    #[derive(Debug, Default, Clone, Copy)]
    pub(crate) struct Blob {
        pub(crate) count: u64,
        sum_x: u64,
        sum_y: u64,
        min: (u32, u32),
        max: (u32, u32),
    }

    impl Blob {
        pub(crate) fn centroid(&self) -> (f64, f64) {
            let n = self.count as f64;
            (self.sum_x as f64 / n, self.sum_y as f64 / n)
        }

        /// Share of the bounding box the blob fills: ~1 square, ~0.79 circle, ~0.5 triangle.
        pub(crate) fn fill(&self) -> f64 {
            let w = f64::from(self.max.0 - self.min.0 + 1);
            let h = f64::from(self.max.1 - self.min.1 + 1);
            self.count as f64 / (w * h)
        }
    }

    /// Pixels within 35 (RGB distance) of each palette colour: half the smallest distance
    /// between two palette entries, so no pixel counts for two colours.
    pub(crate) fn colour_blobs(img: &RgbImage) -> BTreeMap<Colour, Blob> {
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

    pub(crate) fn decode(jpeg: &[u8]) -> RgbImage {
        image::load_from_memory(jpeg).unwrap().into_rgb8()
    }

    /// Checks that `img` shows exactly `scene`: both named colours in sizeable blobs, no
    /// other palette colour, each blob's fill ratio matching its kind, and the centroids in
    /// the stated relation. Returns the blobs for further checks.
    pub(crate) fn assert_grounded(
        img: &RgbImage,
        scene: &Scene,
        what: &str,
    ) -> BTreeMap<Colour, Blob> {
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
    fn story_attribute_accuracy_counts_the_scene_and_the_change() {
        let truth = "the red circle moves left; it is left of the blue square";
        assert_eq!(story_attribute_accuracy(truth, truth), Some(1.0));
        // The scene right, the direction wrong.
        let wrong_way = "the red circle moves right; it is left of the blue square";
        assert_eq!(story_attribute_accuracy(wrong_way, truth), Some(5.0 / 6.0));
        // The image captioner's sentence: the scene right, no change.
        let image = "a red circle left of a blue square";
        assert_eq!(story_attribute_accuracy(image, truth), Some(5.0 / 6.0));
        // Colour and relation wrong, the change a turn.
        let other = "the green circle turns red; it is above the blue square";
        assert_eq!(story_attribute_accuracy(other, truth), Some(4.0 / 6.0));
        assert_eq!(story_attribute_accuracy(truth, "not a story caption"), None);
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
}
