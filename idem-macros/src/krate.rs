//! The path the generated code names idem-runtime by: `::idem_runtime`, or the name the crate
//! being compiled gave it in its Cargo.toml (`idem = { package = "idem-runtime", ... }`), so a
//! renamed dependency works without `crate = "..."`.

use std::sync::OnceLock;

/// The renamed dependency's name, if the manifest of the crate being compiled renames
/// idem-runtime (read once per compilation).
pub(crate) fn renamed() -> Option<&'static str> {
    static NAME: OnceLock<Option<String>> = OnceLock::new();
    NAME.get_or_init(|| {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
        let manifest =
            std::fs::read_to_string(std::path::Path::new(&dir).join("Cargo.toml")).ok()?;
        scan(&manifest)
    })
    .as_deref()
}

/// Find `name = { package = "idem-runtime", ... }` or `[*dependencies.name]` followed by
/// `package = "idem-runtime"`. `None` when idem-runtime is used under its own name (or not at all,
/// or in a form this scan does not know: then `crate = "..."` is the way).
fn scan(manifest: &str) -> Option<String> {
    let mut table_dep: Option<String> = None;
    for raw in manifest.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            let header = line.trim_matches(|c| c == '[' || c == ']').trim();
            table_dep = header
                .split_once("dependencies.")
                .map(|(_, name)| name.trim().trim_matches('"').to_owned());
            if table_dep.as_deref() == Some("idem-runtime") {
                return None;
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim().trim_matches('"'), value.trim());
        let names_the_package = |v: &str| {
            v.split(',').any(|part| {
                part.split_once('=').is_some_and(|(k, v)| {
                    k.trim().trim_start_matches('{').trim() == "package"
                        && v.trim().trim_end_matches('}').trim().trim_matches('"') == "idem-runtime"
                })
            })
        };
        if key == "idem-runtime" {
            return None;
        }
        if value.starts_with('{') && names_the_package(value) {
            return Some(key.replace('-', "_"));
        }
        if key == "package"
            && value.trim_matches('"') == "idem-runtime"
            && let Some(name) = &table_dep
        {
            return Some(name.replace('-', "_"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::scan;

    #[test]
    fn renamed_dependencies_are_found() {
        assert_eq!(scan("[dependencies]\nidem-runtime = \"0.1\"\n"), None);
        assert_eq!(
            scan("[dependencies]\nidem = { package = \"idem-runtime\", path = \"x\" }\n"),
            Some("idem".into())
        );
        assert_eq!(
            scan(
                "[dev-dependencies]\nmy-idem = { path = \"x\", package = \"idem-runtime\" } # renamed\n"
            ),
            Some("my_idem".into())
        );
        assert_eq!(
            scan("[dependencies.idem]\npackage = \"idem-runtime\"\nversion = \"0.1\"\n"),
            Some("idem".into())
        );
        assert_eq!(
            scan("[dependencies.idem-runtime]\nversion = \"0.1\"\n"),
            None
        );
        assert_eq!(scan("[dependencies]\nserde = \"1\"\n"), None);
    }
}
