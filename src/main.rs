use clap::Parser;

fn main() -> std::process::ExitCode {
    modelpress::tune_process();
    let cli = modelpress::cli::Cli::parse();
    modelpress::cli::run(cli)
}
