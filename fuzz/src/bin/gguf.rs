//! AFL entry point for the `gguf` target (see `tunec_fuzz::gguf`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        tunec_fuzz::gguf(data);
    });
}
