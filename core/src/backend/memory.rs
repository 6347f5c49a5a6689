/// Where a device's tensors live and how much of that memory there is: what a caller checks a
/// run's memory needs against before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCapacity {
    /// In the host's memory (the CPU backends): the caller knows how much the host has.
    Host,
    /// In the device's own memory, `bytes` in all (a GPU's).
    Device {
        /// The device's total memory.
        bytes: u64,
    },
    /// In the device's own memory, whose size the runtime does not report (wgpu).
    Unknown,
}
