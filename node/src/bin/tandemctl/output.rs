//! Output helpers shared by every command: aligned tables and JSON.

use super::*;

pub(super) fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t
}

pub(super) fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}
