//! `kvc` binary: parse -> run -> ExitCode (0 ok, 1 finished with failed samples, 2 error).
use std::process::ExitCode;

fn main() -> ExitCode {
    kvc::cli::main()
}
