//! `lime-stage`: not yet a runtime; refuses to start rather than pretend to serve.

fn main() {
    eprintln!("lime-stage: the distributed runtime is not built yet; use `lime generate` for single-process inference");
    std::process::exit(2);
}
