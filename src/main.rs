fn main() {
    std::process::exit(paritybench::cli::main());
}
