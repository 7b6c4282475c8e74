#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

fn main() -> std::process::ExitCode {
    clipft::alloc::keep_freed_memory();
    clipft::cli::main()
}
