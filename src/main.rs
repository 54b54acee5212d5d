//! The `pipeline` binary: a thin shell over the prefcap library.

fn main() -> anyhow::Result<()> {
    prefcap::cli::main()
}
