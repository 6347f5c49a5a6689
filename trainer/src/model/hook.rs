//! Named LISA hooks: where the decoder reads the side network.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Where the LISA decoder reads the side network: `down_i`, the input of the side network's
/// `i`-th zero conv (in the toy, encoder level `i`'s output), or `mid`, the input of the
/// middle block's zero conv (UNets); `block_i`, the input of a transformer ControlNet's
/// `controlnet_blocks[i]` (the image tokens after its block `i`); `single_block_i`, the input
/// of a Flux ControlNet's `controlnet_single_blocks[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum HookLayer {
    /// The output of encoder level `i`, before its zero conv.
    Down(usize),
    /// The middle block's output, before its zero conv.
    Mid,
    /// A transformer ControlNet's block `i` output, before its zero linear.
    Block(usize),
    /// A Flux ControlNet's single-stream block `i` output (image tokens), before its zero
    /// linear.
    SingleBlock(usize),
}

impl std::str::FromStr for HookLayer {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "mid" {
            return Ok(HookLayer::Mid);
        }
        let index = |prefix: &str| s.strip_prefix(prefix).and_then(|i| i.parse().ok());
        index("down_")
            .map(HookLayer::Down)
            .or_else(|| index("block_").map(HookLayer::Block))
            .or_else(|| index("single_block_").map(HookLayer::SingleBlock))
            .ok_or_else(|| {
                TrainError::Config(format!(
                    "unknown hook layer {s:?}: expected down_0 .. down_N, mid, block_0 .. block_N or single_block_0 .. single_block_N"
                ))
            })
    }
}

impl TryFrom<String> for HookLayer {
    type Error = TrainError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<HookLayer> for String {
    fn from(h: HookLayer) -> String {
        h.to_string()
    }
}

impl std::fmt::Display for HookLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookLayer::Down(i) => write!(f, "down_{i}"),
            HookLayer::Mid => f.write_str("mid"),
            HookLayer::Block(i) => write!(f, "block_{i}"),
            HookLayer::SingleBlock(i) => write!(f, "single_block_{i}"),
        }
    }
}
