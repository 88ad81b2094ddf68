//! Compiles recipe files and prints their forward IR, or the diagnostic: `cargo run -p frontend --example dump -- FILE..`.

fn main() {
    let mut failed = false;
    for arg in std::env::args().skip(1) {
        let start = std::time::Instant::now();
        match frontend::compile_file(std::path::Path::new(&arg), models::library()) {
            Ok(r) => {
                let took = start.elapsed();
                print!("{}", ir::text::print(&r.forward));
                eprintln!("{arg}: {} nodes in {:.1} ms", r.forward.nodes.len(), took.as_secs_f64() * 1e3);
            }
            Err(d) => {
                eprint!("{}", d.render());
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
