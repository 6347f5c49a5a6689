//! Image files through the `image` crate: validation grids and sample sheets out, condition
//! and target images in. The one hand-written piece is [`max_pool`]: a 1-px outline must
//! survive a 512 → 16 downscale, which no interpolating filter guarantees.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use image::imageops::{self, FilterType};
use image::{GrayImage, ImageFormat, RgbImage};
use lisa_trainer::validation::RgbGrid;
use lisa_trainer::weights::write_atomic;

/// A data file's bytes: a file, or a member of a tar shard named `SHARD#OFFSET+SIZE` (the
/// index `--train-shards` writes: the member is read in place, never copied out).
pub fn read_bytes(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    match tar_member(path) {
        None => std::fs::read(path),
        Some((shard, offset, size)) => {
            let mut file = std::fs::File::open(&shard)?;
            if offset.saturating_add(size) > file.metadata()?.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} is shorter than the member at {offset} + {size} (the shard changed?)", shard.display()),
                ));
            }
            file.seek(SeekFrom::Start(offset))?;
            let mut bytes = vec![0; size as usize];
            file.read_exact(&mut bytes)?;
            Ok(bytes)
        }
    }
}

/// Whether a data file (or a shard member, [`read_bytes`]) is there.
pub fn data_exists(path: &Path) -> bool {
    match tar_member(path) {
        None => path.is_file(),
        Some((shard, offset, size)) => {
            std::fs::metadata(shard).is_ok_and(|m| m.is_file() && offset.saturating_add(size) <= m.len())
        }
    }
}

/// `(shard, offset, size)` of a member reference `SHARD#OFFSET+SIZE` that is not a file itself.
pub fn tar_member(path: &Path) -> Option<(std::path::PathBuf, u64, u64)> {
    if path.is_file() {
        return None;
    }
    let text = path.to_str()?;
    let (shard, place) = text.rsplit_once('#')?;
    let (offset, size) = place.split_once('+')?;
    Some((shard.into(), offset.parse().ok()?, size.parse().ok()?))
}

/// A reference [`read_bytes`] reads: `size` bytes at `offset` of `shard`.
pub fn member_reference(shard: &Path, offset: u64, size: u64) -> String {
    format!("{}#{offset}+{size}", shard.display())
}

/// Writes a validation grid (the library's RGB pixels) as a PNG, atomically.
pub fn save_grid(grid: &RgbGrid, path: &Path) -> Result<()> {
    let img = RgbImage::from_raw(grid.width as u32, grid.height as u32, grid.pixels.clone())
        .with_context(|| format!("a {}×{} grid with {} bytes", grid.width, grid.height, grid.pixels.len()))?;
    save_png(&img, path)
}

/// Writes a PNG atomically (temporary file, fsync, rename).
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png).with_context(|| format!("encoding {}", path.display()))?;
    write_atomic(path, bytes.get_ref())?;
    Ok(())
}

/// The largest image side [`read_image`] decodes.
pub const MAX_SIDE: u32 = 16384;
/// The most memory one decoded image may take.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// How [`read_image`] maps a file onto the model's grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// A smooth (triangle-filter) resize: images.
    Smooth,
    /// The maximum of the source pixels under each output pixel: thin outlines.
    Max,
    /// The shorter side resized (smoothly) to `side`, then the centre `side × side` cut out:
    /// diffusers' `Resize(side)` + `CenterCrop(side)` of its training scripts (aspect kept).
    CenterCrop,
}

/// Reads an image file (any format and mode the `image` crate decodes) as planar f32 in
/// [0, 1], resized to `side × side`: `[1, side, side]` luminance when `grey`, else
/// `[3, side, side]` RGB. Errors say what failed; the caller names the file.
pub fn read_image(path: &Path, side: usize, grey: bool, resample: Resample) -> Result<Vec<f32>> {
    let bytes = read_bytes(path).context("cannot open")?;
    let mut reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().context("cannot read")?;
    // The header's size is checked before any pixel buffer is allocated.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow::anyhow!(
            "the image is larger than lisa reads ({MAX_SIDE} px a side, {} MiB decoded)",
            MAX_DECODED_BYTES >> 20
        ),
        // The decoders' own messages can hold debug dumps of their internals: say what failed.
        image::ImageError::Decoding(d) => {
            anyhow::anyhow!("not a readable image (its {} data is corrupt)", d.format_hint())
        }
        image::ImageError::Unsupported(_) => anyhow::anyhow!("not an image format lisa reads (PNG, JPEG)"),
        image::ImageError::IoError(e) => anyhow::Error::from(e).context("cannot read"),
        _ => anyhow::anyhow!("not a readable image"),
    })?;
    let s = side as u32;
    Ok(if grey {
        let luma = img.to_luma8();
        let small = match resample {
            Resample::Smooth => imageops::resize(&luma, s, s, FilterType::Triangle),
            Resample::Max => max_pool(&luma, side),
            Resample::CenterCrop => center_crop(&luma, side),
        };
        small.pixels().map(|p| p.0[0] as f32 / 255.0).collect()
    } else {
        let rgb = match resample {
            Resample::Smooth => imageops::resize(&img.to_rgb8(), s, s, FilterType::Triangle),
            Resample::CenterCrop => center_crop(&img.to_rgb8(), side),
            Resample::Max => return Err(anyhow::anyhow!("max pooling applies to grey condition images")),
        };
        (0..3).flat_map(|c| rgb.pixels().map(move |p| p.0[c] as f32 / 255.0)).collect()
    })
}

/// The shorter side resized to `side` (the longer to `⌊side·long/short⌋`), then the centre
/// square (offsets rounded as torchvision's `CenterCrop`).
fn center_crop<P: image::Pixel<Subpixel = u8> + 'static>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    side: usize,
) -> image::ImageBuffer<P, Vec<u8>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (short, long) = (w.min(h).max(1), w.max(h));
    let scaled_long = (side * long / short).max(side);
    let (nw, nh) = if w <= h { (side, scaled_long) } else { (scaled_long, side) };
    let resized = imageops::resize(img, nw as u32, nh as u32, FilterType::Triangle);
    let left = ((nw - side) as f64 / 2.0).round() as u32;
    let top = ((nh - side) as f64 / 2.0).round() as u32;
    imageops::crop_imm(&resized, left, top, side as u32, side as u32).to_image()
}

/// Downscales by the maximum over each output pixel's source span `[x·w/side, (x+1)·w/side)`
/// (at least one pixel), so that thin bright lines survive.
pub fn max_pool(img: &GrayImage, side: usize) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let span = |i: usize, n: usize| (i * n / side, ((i + 1) * n / side).max(i * n / side + 1).min(n));
    GrayImage::from_fn(side as u32, side as u32, |x, y| {
        let ((x0, x1), (y0, y1)) = (span(x as usize, w), span(y as usize, h));
        let max = (y0..y1)
            .flat_map(|sy| (x0..x1).map(move |sx| (sx, sy)))
            .map(|(sx, sy)| img.get_pixel(sx as u32, sy as u32).0[0])
            .max();
        image::Luma([max.unwrap_or(0)])
    })
}

#[cfg(test)]
mod member_tests {
    use std::path::Path;

    use super::{data_exists, member_reference, read_bytes, tar_member};

    #[test]
    fn shard_members_are_read_in_place() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("lisa-tar-member-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shard = dir.join("s.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&shard).unwrap());
        for (name, bytes) in [("a.txt", &b"first"[..]), ("b.png", &b"second part"[..])] {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_cksum();
            b.append_data(&mut header, name, bytes).unwrap();
        }
        b.finish().unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&shard).unwrap());
        let mut refs = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut e = entry.unwrap();
            refs.push(member_reference(&shard, e.raw_file_position(), e.size()));
            e.read_to_end(&mut Vec::new()).unwrap();
        }
        assert_eq!(read_bytes(Path::new(&refs[1])).unwrap(), b"second part");
        let past_the_end = format!("{}#0+99999", shard.display());
        assert!(data_exists(Path::new(&refs[0])) && !data_exists(Path::new(&past_the_end)));
        assert!(read_bytes(Path::new(&past_the_end)).is_err(), "past the shard's end");
        assert_eq!(tar_member(&shard), None, "a real file is no member");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
