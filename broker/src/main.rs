//! `lime-broker`: not yet a broker; refuses to start rather than pretend to serve.

fn main() {
    eprintln!("lime-broker: the embedded broker is not built yet");
    std::process::exit(2);
}
