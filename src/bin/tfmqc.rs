//! The `tfmqc` command: the command line of src/main.rs, which is also a library.

fn main() -> std::process::ExitCode {
    tfmqc::main()
}
