use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = modelpress::cli::Cli::parse();
    modelpress::cli::run(cli)
}
