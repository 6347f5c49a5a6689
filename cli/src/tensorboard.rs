//! `--report-to tensorboard`: the run's losses, learning rate, speed, validation metrics and
//! grids as TensorBoard event files, beside `metrics.jsonl` (which is unchanged).
//!
//! An event file is a sequence of TFRecords, each `len: u64 LE, masked_crc32c(len): u32 LE,
//! data, masked_crc32c(data): u32 LE`, whose data is one serialized `tensorflow.Event`
//! protocol buffer (`event.proto`, `summary.proto`). Written by hand because only a few fields
//! are needed (an event's wall time, step, file version, summary or session log; a summary
//! value's tag with a scalar or a PNG image) and the Rust TensorBoard crates are unmaintained
//! and pull an old protobuf runtime; the checksum is the `crc32c` crate's.
//!
//! A run writes a new file each time it starts, beginning with a `SessionLog` START at its
//! first new step, which tells TensorBoard to drop what an earlier process logged in the same
//! folder from that step on (the steps a resume from an older checkpoint redoes, or a run
//! started over).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lisa_trainer::grid::RgbGrid;
use lisa_trainer::session::Event;

/// The first record of every file (`Event.file_version`), which TensorBoard checks.
const FILE_VERSION: &str = "brain.Event:2";

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Protocol-buffer encoding of the few field kinds an event needs.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field << 3 | u32::from(wire)));
    }
    /// A varint field (int32, int64, enum); left out at 0, as proto3 writes defaults.
    fn int(mut self, field: u32, v: i64) -> Self {
        if v == 0 {
            return self;
        }
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    /// A 64-bit field (double).
    fn double(mut self, field: u32, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A 32-bit field (float).
    fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-delimited field (string, bytes, message).
    fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
}

/// `Summary.Value`: a tag with a scalar (`simple_value`, field 2) or an image (field 4).
enum Value<'a> {
    Scalar(f32),
    /// `Summary.Image`: height, width, colour space (3: RGB), PNG bytes.
    Png {
        width: usize,
        height: usize,
        png: &'a [u8],
    },
}

/// Writes one run's event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named as TensorBoard finds them
    /// (`events.out.tfevents.<seconds>.<host>.<pid>`), starting with the file version.
    /// TensorBoard reads a folder's files in name order, so the name sorts after every event
    /// file already there (its seconds moved past the latest one's if need be: a run resumed
    /// within the second its predecessor started in must still come after it).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() || host.contains(['/', '.']) { "localhost".to_string() } else { host };
        // The latest start time among this folder's event files (names lisa and TensorBoard's
        // writers give them; other files are left alone).
        let latest = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                name.strip_prefix("events.out.tfevents.")?.split('.').next()?.parse::<u64>().ok()
            })
            .max();
        let now = wall_time() as u64;
        let seconds = latest.map_or(now, |l| now.max(l + 1));
        let name = |seconds: u64| format!("events.out.tfevents.{seconds:010}.{host}.{}", std::process::id());
        let path = dir.join(name(seconds));
        let file = File::options()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self { file: BufWriter::new(file), path };
        w.write(&file_version_event(wall_time()))?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `SessionLog { status: START }` at `step`: TensorBoard drops this run's earlier events
    /// from `step` on.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        self.write(&session_start_event(wall_time(), step))
    }

    /// Scalars at `step`, one summary value each.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        let values: Vec<_> = values.iter().map(|&(tag, v)| (tag, Value::Scalar(v))).collect();
        self.write(&summary_event(wall_time(), step, &values))
    }

    /// An RGB image (PNG-encoded) at `step`.
    pub fn image(&mut self, step: u64, tag: &str, width: usize, height: usize, png: &[u8]) -> Result<()> {
        self.write(&summary_event(wall_time(), step, &[(tag, Value::Png { width, height, png })]))
    }

    /// One event as a TFRecord, flushed: a run killed at any point leaves whole records.
    fn write(&mut self, event: &[u8]) -> Result<()> {
        let path = &self.path;
        self.file
            .write_all(&record(event))
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// `Event { wall_time, file_version }`: the first event of every file.
fn file_version_event(wall_time: f64) -> Vec<u8> {
    Message::default().double(1, wall_time).bytes(3, FILE_VERSION.as_bytes()).0
}

/// `Event { wall_time, step, session_log: SessionLog { status: START } }` (field 7).
fn session_start_event(wall_time: f64, step: u64) -> Vec<u8> {
    let log = Message::default().int(1, 1);
    Message::default().double(1, wall_time).int(2, step as i64).bytes(7, &log.0).0
}

/// `Event { wall_time, step, summary: Summary { value: [...] } }`.
fn summary_event(wall_time: f64, step: u64, values: &[(&str, Value<'_>)]) -> Vec<u8> {
    let mut summary = Message::default();
    for (tag, value) in values {
        let v = Message::default().bytes(1, tag.as_bytes());
        let v = match value {
            Value::Scalar(x) => v.float(2, *x),
            Value::Png { width, height, png } => {
                let image = Message::default().int(1, *height as i64).int(2, *width as i64).int(3, 3).bytes(4, png);
                v.bytes(4, &image.0)
            }
        };
        summary = summary.bytes(1, &v.0);
    }
    Message::default().double(1, wall_time).int(2, step as i64).bytes(5, &summary.0).0
}

/// `data` framed as a TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Seconds since the Unix epoch.
fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// What `--report-to tensorboard` writes of a run's events, into `dir` (the logging folder).
pub struct TensorBoard {
    dir: PathBuf,
    writer: Option<EventWriter>,
}

impl TensorBoard {
    /// A reporter writing into `dir` once the run starts.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, writer: None }
    }

    /// Writes what `event` carries for TensorBoard.
    pub fn on_event(&mut self, event: &Event<'_>) -> Result<()> {
        if let Event::Started { first_step, .. } = event {
            let mut w = EventWriter::create(&self.dir)?;
            // Every start, fresh or resumed: what an earlier process logged in this folder
            // from the first new step on is no longer this run's.
            w.session_start(first_step + 1)?;
            eprintln!("TensorBoard event file: {}", w.path().display());
            self.writer = Some(w);
            return Ok(());
        }
        let Some(w) = self.writer.as_mut() else { return Ok(()) };
        match event {
            Event::Step { stats, steps_per_second } => {
                let mut scalars = vec![
                    ("train/loss", stats.loss),
                    ("train/diffusion_loss", stats.main_loss),
                    ("train/lisa_loss", stats.lisa_loss),
                    ("train/grad_norm", stats.grad_norm),
                    ("train/lr", stats.lr),
                    ("train/steps_per_second", *steps_per_second as f32),
                ];
                if let Some(scale) = stats.loss_scale {
                    scalars.push(("train/loss_scale", scale));
                }
                w.scalars(stats.step, &scalars)
            }
            Event::Validation { step, report } => {
                let numbers: Vec<(String, f32)> = report
                    .metrics
                    .iter()
                    .filter_map(|(k, v)| v.as_f64().map(|v| (format!("validation/{k}"), v as f32)))
                    .collect();
                let refs: Vec<(&str, f32)> = numbers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                if !refs.is_empty() {
                    w.scalars(*step, &refs)?;
                }
                match &report.grid {
                    Some(grid) => w.image(*step, "validation/grid", grid.width, grid.height, &png(grid)?),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// The grid as PNG bytes.
fn png(grid: &RgbGrid) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(grid.width as u32, grid.height as u32, grid.pixels.clone())
        .with_context(|| format!("a {}×{} grid with {} bytes", grid.width, grid.height, grid.pixels.len()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).context("encoding the validation grid")?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of an event file, checksums verified: the data of each.
    pub fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn masked_crc_is_tfrecords() {
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value), then masked.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn events_encode_as_protocol_buffers() {
        // Field 2 (step) = 300 as a varint: key 0x10, then 0xAC 0x02.
        assert_eq!(Message::default().int(2, 300).0, [0x10, 0xac, 0x02]);
        // Field 2 (simple_value) = 1.0 as a float: key 0x15.
        assert_eq!(Message::default().float(2, 1.0).0, [0x15, 0, 0, 0x80, 0x3f]);
        // Field 1 (tag) = "a": key 0x0a, length 1.
        assert_eq!(Message::default().bytes(1, b"a").0, [0x0a, 1, b'a']);
    }

    /// The same events, byte for byte, as TensorBoard's own writer wrote them
    /// (`scripts/goldens/tensorboard_events.py`: wall time 1.5; a file version, a session
    /// start at step 2, two scalars at step 3, a 2×1 PNG at step 4).
    #[test]
    fn events_match_tensorboards_writer() {
        let golden = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard/events.out.tfevents.golden"),
        )
        .unwrap();
        let png = [137u8, 80, 78, 71, 13, 10, 26, 10];
        let ours = [
            record(&file_version_event(1.5)),
            record(&session_start_event(1.5, 2)),
            record(&summary_event(1.5, 3, &[("train/loss", Value::Scalar(0.5)), ("train/lr", Value::Scalar(1e-5))])),
            record(&summary_event(1.5, 4, &[("validation/grid", Value::Png { width: 2, height: 1, png: &png })])),
        ]
        .concat();
        assert_eq!(records(&ours).len(), 4);
        assert_eq!(ours, golden);
    }

    #[test]
    fn a_file_holds_whole_checked_records() {
        let dir = std::env::temp_dir().join(format!("lisa-tb-unit-{}", std::process::id()));
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalars(3, &[("train/loss", 0.5)]).unwrap();
        w.session_start(4).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let records = records(&bytes);
        assert_eq!(records.len(), 3);
        assert!(records[0].windows(FILE_VERSION.len()).any(|w| w == FILE_VERSION.as_bytes()));
        assert!(records[1].windows(10).any(|w| w == b"train/loss"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
