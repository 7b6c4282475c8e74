fn main() -> std::process::ExitCode {
    clipft::cli::main()
}
