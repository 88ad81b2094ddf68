//! AFL entry point for the `model_dir` target (see `tunec_fuzz::model_dir`).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        tunec_fuzz::model_dir(data);
    });
}
