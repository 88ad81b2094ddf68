//! AFL entry point for the `plan` target (see `tunec_fuzz::plan`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        tunec_fuzz::plan(data);
    });
}
