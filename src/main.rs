//! The `pulse` command line: parses arguments, starts telemetry, tunes the
//! allocator for the pipeline and dispatches to [`commands`].

mod cli;
mod commands;
mod memory;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Cmd};

/// mimalloc instead of the system allocator: `pulse serve` allocates small
/// buffers per request on every worker thread, where glibc's arenas showed
/// up as lock waits and consolidation in profiles.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    commands::init_tracing();
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        memory::purge_freed_memory_soon();
        memory::small_pages_only();
    }
    match cli.cmd {
        Cmd::Demo(a) => commands::demo(a).await,
        Cmd::Gen(a) => commands::generate(a).await,
        Cmd::Run(a) => commands::run(a).await,
        Cmd::Serve(a) => commands::serve(a).await,
        Cmd::Bench(a) => commands::bench(a).await,
        Cmd::RecoEval(a) => commands::reco_eval(a).await,
        Cmd::Detect(a) => commands::detect(a).await,
        Cmd::Nab(a) => commands::nab(a).await,
        Cmd::Query(a) => commands::query(a).await,
        Cmd::Model(a) => commands::model(a).await,
    }
}
