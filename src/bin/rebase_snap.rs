//! `tern-rebase-snap`: merges a diff snapshot's memory file onto its base, in place (the same
//! interface as Firecracker's `rebase-snap`). Apply diffs in the order they were taken; the
//! merged base then loads with the last diff's state file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Merge a diff memory file onto its base memory file.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// The base memory file (a full snapshot's, or one already merged); written in place.
    #[arg(long, value_name = "PATH")]
    base_file: PathBuf,
    /// The diff memory file (sparse: its data ranges are the pages it holds).
    #[arg(long, value_name = "PATH")]
    diff_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match vmm::snapshot::merge_diff(&args.base_file, &args.diff_file) {
        Ok(bytes) => {
            println!(
                "merged {bytes} bytes of {} onto {}",
                args.diff_file.display(),
                args.base_file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern-rebase-snap: {e}");
            ExitCode::FAILURE
        }
    }
}
