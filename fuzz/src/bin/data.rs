//! AFL entry point for the `data` target (see `tunec_fuzz::data`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        tunec_fuzz::data(data);
    });
}
