//! AFL entry point for the `checkpoint` target (see `tunec_fuzz::checkpoint`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        tunec_fuzz::checkpoint(data);
    });
}
