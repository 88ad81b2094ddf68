//! AFL entry point for the `dsl` target (see `tunec_fuzz::dsl`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        tunec_fuzz::dsl(data);
    });
}
