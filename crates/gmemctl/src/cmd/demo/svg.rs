//! The placement map: one cell per chunk, coloured by node, one panel per snapshot, with
//! chunks that got new page frames hatched (on one node, that is the only visible change).

use std::fmt::Write as _;
use std::path::Path;

use gmem::numa::NodeId;

use super::DemoError;
use super::render::{gbps, short_duration};
use super::report::{DemoReport, MoveResult};
use super::snapshot::{ChunkRelocation, Snapshot};

/// Fill colours for nodes 0, 1, ... (repeating after eight).
const NODE_COLOURS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
];
const NOT_RESIDENT: &str = "#d9d9d9";
const MARGIN: usize = 20;
const PANELS_PER_ROW: usize = 3;
const MIN_PANEL_WIDTH: usize = 260;
const PANEL_SPACING: usize = 30;
const LINE: usize = 16;
const WRAP_CHARS: usize = 120;

/// How many of a chunk's pages got new frames since the panel before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewFrames {
    /// First panel, or PFNs unreadable.
    Unknown,
    None,
    Some,
    All,
}

impl From<ChunkRelocation> for NewFrames {
    fn from(r: ChunkRelocation) -> Self {
        match r.changed {
            0 => NewFrames::None,
            _ if r.all() => NewFrames::All,
            _ => NewFrames::Some,
        }
    }
}

#[derive(Debug)]
struct Cell {
    node: Option<NodeId>,
    new_frames: NewFrames,
}

#[derive(Debug)]
struct Panel {
    title: String,
    captions: Vec<String>,
    cells: Vec<Cell>,
}

/// Caption lines under each panel.
const CAPTION_LINES: usize = 2;

/// Cell size and grid shape, shared by every panel.
#[derive(Debug, Clone, Copy)]
struct Grid {
    columns: usize,
    rows: usize,
    cell: usize,
    gap: usize,
}

impl Grid {
    /// About twice as wide as high; cells shrink as chunks grow in number.
    fn for_chunks(chunks: usize) -> Self {
        let columns = ((2.0 * chunks as f64).sqrt().ceil() as usize).clamp(1, 64);
        let cell = if columns <= 16 {
            14
        } else {
            (224 / columns).max(3)
        };
        Grid {
            columns,
            rows: chunks.div_ceil(columns),
            cell,
            gap: if cell >= 8 { 2 } else { 1 },
        }
    }

    fn width(&self) -> usize {
        self.columns * (self.cell + self.gap) - self.gap
    }

    fn height(&self) -> usize {
        self.rows * (self.cell + self.gap) - self.gap
    }
}

/// Writes the map of `report` to `path`.
pub fn write(path: &Path, report: &DemoReport) -> Result<(), DemoError> {
    std::fs::write(path, render(report)).map_err(|source| DemoError::WriteSvg {
        path: path.to_owned(),
        source,
    })
}

/// The SVG text.
pub fn render(report: &DemoReport) -> String {
    let panels = panels(report);
    let grid = Grid::for_chunks(panels.first().map_or(1, |p| p.cells.len()));
    let panel_width = grid.width().max(MIN_PANEL_WIDTH);
    let per_row = PANELS_PER_ROW.min(panels.len()).max(1);
    let header = header_lines(report);
    let top = MARGIN + header.len() * LINE + 14;
    let panel_height = 2 * LINE + grid.height() + CAPTION_LINES * LINE;
    let rows = panels.len().div_ceil(per_row);
    let legend_top = top + rows * (panel_height + PANEL_SPACING) - PANEL_SPACING / 2;
    let legend = legend_items(report, &panels);
    let widest_text = header
        .iter()
        .enumerate()
        .map(|(i, l)| text_width(l, if i == 0 { 17 } else { 12 }))
        .chain(legend.iter().map(|item| 20 + text_width(&item.label, 11)))
        .max()
        .unwrap_or(0);
    let width = (2 * MARGIN + per_row * panel_width + (per_row - 1) * PANEL_SPACING)
        .max(2 * MARGIN + widest_text);
    let height = legend_top + legend.len() * LINE + MARGIN;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    svg.push_str(DEFS);
    let _ = writeln!(
        svg,
        r##"<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>"##
    );
    for (i, line) in header.iter().enumerate() {
        let (size, weight) = if i == 0 { (17, "bold") } else { (12, "normal") };
        text(&mut svg, MARGIN, MARGIN + 10 + i * LINE, size, weight, line);
    }
    for (i, panel) in panels.iter().enumerate() {
        let x = MARGIN + (i % per_row) * (panel_width + PANEL_SPACING);
        let y = top + (i / per_row) * (panel_height + PANEL_SPACING);
        draw_panel(&mut svg, panel, grid, x, y);
    }
    draw_legend(&mut svg, &legend, legend_top);
    svg.push_str("</svg>\n");
    svg
}

const DEFS: &str = r##"<defs>
<pattern id="all-new-frames" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="4" stroke="#ffffff" stroke-width="1.6"/></pattern>
<pattern id="some-new-frames" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(-45)"><line x1="0" y1="0" x2="0" y2="8" stroke="#ffffff" stroke-width="1.6"/></pattern>
</defs>
"##;

fn header_lines(report: &DemoReport) -> Vec<String> {
    let mut lines = vec![format!(
        "gmemctl demo: where the guest's {} MiB live, one cell per {} MiB chunk ({} chunks)",
        report.guest.mem_bytes >> 20,
        report.guest.chunk_bytes >> 20,
        report.guest.chunks
    )];
    lines.extend(wrap(&report.explanation, WRAP_CHARS));
    lines.push(format!(
        "guest mismatches {}, host content checks {} of {} matched, kernel {}",
        report.guest_check.mismatches,
        report.totals.content_checks - report.totals.content_mismatches,
        report.totals.content_checks,
        report.machine.kernel_release
    ));
    lines
}

fn panels(report: &DemoReport) -> Vec<Panel> {
    let snapshots = &report.placement;
    snapshots
        .iter()
        .enumerate()
        .map(|(i, snapshot)| {
            let relocations = i
                .checked_sub(1)
                .and_then(|prev| snapshot.relocations_since(&snapshots[prev]));
            let captions = match i.checked_sub(1).and_then(|m| report.moves.get(m)) {
                None => vec![pages_caption(snapshot), "as booted".to_owned()],
                Some(m) => move_captions(m, snapshot.chunks.len()),
            };
            Panel {
                title: snapshot.label.clone(),
                captions,
                cells: cells(snapshot, relocations.as_deref()),
            }
        })
        .collect()
}

fn move_captions(m: &MoveResult, chunks: usize) -> Vec<String> {
    let stops = &m.migration.stops;
    vec![
        format!(
            "{}: {} of {chunks} chunks got new frames",
            m.migration.mechanism,
            m.chunks_with_new_frames
                .map_or("?".to_owned(), |n| n.to_string()),
        ),
        format!(
            "stops p50 {} / p99 {}, {} GB/s",
            short_duration(stops.p50_us),
            short_duration(stops.p99_us),
            gbps(m.migration.throughput_gbps)
        ),
    ]
}

fn pages_caption(snapshot: &Snapshot) -> String {
    let nodes: Vec<String> = snapshot
        .pages_per_node
        .iter()
        .map(|(node, pages)| format!("{pages} pages on node {node}"))
        .collect();
    nodes.join(", ")
}

fn cells(snapshot: &Snapshot, relocations: Option<&[ChunkRelocation]>) -> Vec<Cell> {
    snapshot
        .chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| Cell {
            node: chunk.node,
            new_frames: relocations
                .and_then(|r| r.get(i))
                .map_or(NewFrames::Unknown, |&r| r.into()),
        })
        .collect()
}

fn draw_panel(svg: &mut String, panel: &Panel, grid: Grid, x: usize, y: usize) {
    text(svg, x, y + 12, 13, "bold", &panel.title);
    let grid_top = y + 2 * LINE - 6;
    for (i, cell) in panel.cells.iter().enumerate() {
        let cx = x + (i % grid.columns) * (grid.cell + grid.gap);
        let cy = grid_top + (i / grid.columns) * (grid.cell + grid.gap);
        draw_cell(svg, cell, cx, cy, grid.cell);
    }
    for (line, caption) in panel.captions.iter().enumerate() {
        let y = grid_top + grid.height() + (line + 1) * LINE;
        text(svg, x, y, 11, "normal", caption);
    }
}

fn draw_cell(svg: &mut String, cell: &Cell, x: usize, y: usize, size: usize) {
    let fill = cell.node.map_or(NOT_RESIDENT, node_colour);
    let outline = match cell.new_frames {
        NewFrames::All => r##" stroke="#1a1a1a" stroke-width="1""##,
        _ => "",
    };
    let _ = writeln!(
        svg,
        r#"<rect class="cell" x="{x}" y="{y}" width="{size}" height="{size}" fill="{fill}"{outline}/>"#
    );
    let pattern = match cell.new_frames {
        NewFrames::All => "all-new-frames",
        NewFrames::Some => "some-new-frames",
        NewFrames::None | NewFrames::Unknown => return,
    };
    let _ = writeln!(
        svg,
        r#"<rect class="mark" x="{x}" y="{y}" width="{size}" height="{size}" fill="url(#{pattern})"/>"#
    );
}

/// One legend entry: a swatch and what it means.
#[derive(Debug)]
struct LegendItem {
    fill: String,
    hatch: Option<&'static str>,
    label: String,
}

fn legend_items(report: &DemoReport, panels: &[Panel]) -> Vec<LegendItem> {
    let mut nodes: Vec<NodeId> = report
        .placement
        .iter()
        .flat_map(|s| s.chunks.iter().filter_map(|c| c.node))
        .collect();
    nodes.sort();
    nodes.dedup();
    let mut items: Vec<LegendItem> = nodes
        .iter()
        .map(|&node| LegendItem {
            fill: node_colour(node).to_owned(),
            hatch: None,
            label: format!(
                "chunk on NUMA node {node} (where most of its pages are, per move_pages)"
            ),
        })
        .collect();
    let any_not_resident = report
        .placement
        .iter()
        .any(|s| s.chunks.iter().any(|c| c.node.is_none()));
    if any_not_resident {
        items.push(LegendItem {
            fill: NOT_RESIDENT.to_owned(),
            hatch: None,
            label: "chunk with no resident page".into(),
        });
    }
    let sample = node_colour(nodes.first().copied().unwrap_or(NodeId(0))).to_owned();
    let seen = |frames| {
        panels
            .iter()
            .any(|p| p.cells.iter().any(|c| c.new_frames == frames))
    };
    if seen(NewFrames::All) {
        items.push(LegendItem {
            fill: sample.clone(),
            hatch: Some("all-new-frames"),
            label: "outlined and hatched: every page of the chunk has a new page frame (PFN from \
                    /proc/self/pagemap) since the panel before"
                .into(),
        });
    }
    if seen(NewFrames::Some) {
        items.push(LegendItem {
            fill: sample.clone(),
            hatch: Some("some-new-frames"),
            label: "sparsely hatched: only some of its pages have new frames".into(),
        });
    }
    if seen(NewFrames::None) {
        items.push(LegendItem {
            fill: sample,
            hatch: None,
            label: "plain (after a move): the chunk kept its page frames".into(),
        });
    }
    items
}

fn draw_legend(svg: &mut String, items: &[LegendItem], top: usize) {
    for (i, item) in items.iter().enumerate() {
        let y = top + i * LINE;
        let outline = if item.hatch == Some("all-new-frames") {
            r##" stroke="#1a1a1a" stroke-width="1""##
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<rect x="{MARGIN}" y="{y}" width="12" height="12" fill="{}"{outline}/>"#,
            item.fill
        );
        if let Some(hatch) = item.hatch {
            let _ = writeln!(
                svg,
                r#"<rect x="{MARGIN}" y="{y}" width="12" height="12" fill="url(#{hatch})"/>"#
            );
        }
        text(svg, MARGIN + 20, y + 10, 11, "normal", &item.label);
    }
}

/// Rough rendered width of `text` in pixels (sans-serif averages ~0.6 em per character).
fn text_width(text: &str, size: usize) -> usize {
    text.chars().count() * size * 58 / 100
}

fn node_colour(node: NodeId) -> &'static str {
    NODE_COLOURS[node.0 as usize % NODE_COLOURS.len()]
}

fn text(svg: &mut String, x: usize, y: usize, size: usize, weight: &str, content: &str) {
    let _ = writeln!(
        svg,
        r##"<text x="{x}" y="{y}" font-size="{size}" font-weight="{weight}" fill="#1a1a1a">{}</text>"##,
        escape(content)
    );
}

/// Escapes text for XML content and attributes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Splits `text` into lines of at most about `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert!(wrap("", 5).is_empty());
    }

    #[test]
    fn grids_grow_wider_than_tall() {
        let g = Grid::for_chunks(128);
        assert_eq!((g.columns, g.rows), (16, 8));
        let g = Grid::for_chunks(32);
        assert_eq!((g.columns, g.rows), (8, 4));
        let g = Grid::for_chunks(2048);
        assert!(g.columns * g.rows >= 2048 && g.cell >= 3);
    }
}
