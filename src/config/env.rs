//! `${NAME}` in config values: one file for every pod, each sidecar filling in its own
//! identity, addresses and paths from its environment (the pod's namespace and service
//! account, from the Kubernetes downward API), as the peers' injectors do by templating.
//!
//! - `${NAME}` is the variable's value; unset, the config is refused, naming the key and
//!   the variable (an empty identity or address must not pass for a value).
//! - `${NAME:-default}` is `default` when the variable is unset or empty.
//! - `$$` is a `$`; any other `$` is itself.
//! - Only values are expanded, never keys, and after the YAML is parsed, so a variable can
//!   neither add keys nor turn up inside a comment. What a reference gives is text; a value
//!   that is one reference and nothing else is read as a number or a boolean where the key
//!   takes one (`max_connections: ${LIMIT}`), see [`Expanded::retype`].

use serde_json::Value;

use super::ConfigError;

/// The values that were one reference and read as a number or a boolean: their key path
/// (as key-path errors name it), their JSON pointer, and that value.
#[derive(Debug, Default)]
pub struct Expanded(Vec<(String, String, Value)>);

impl Expanded {
    /// After a type error at `path`: if the value there came whole from a reference and reads
    /// as a number or a boolean, puts that in `value` instead of the text (once) and says so.
    pub fn retype(&mut self, value: &mut Value, path: &str) -> bool {
        let Some(i) = self.0.iter().position(|(p, _, _)| p == path) else {
            return false;
        };
        let (_, pointer, typed) = self.0.swap_remove(i);
        match value.pointer_mut(&pointer) {
            Some(slot) => {
                *slot = typed;
                true
            }
            None => false,
        }
    }
}

/// Expands every string value in `value`, looking variables up with `lookup`.
pub fn expand(
    value: &mut Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Expanded, ConfigError> {
    let mut expanded = Expanded::default();
    let mut at = Place::default();
    walk(value, &mut at, lookup, &mut expanded)?;
    Ok(expanded)
}

/// Where the walk is: as a key path (`a.b[1]`) and as a JSON pointer (`/a/b/1`).
#[derive(Default)]
struct Place {
    path: String,
    pointer: String,
}

fn walk(
    value: &mut Value,
    at: &mut Place,
    lookup: &dyn Fn(&str) -> Option<String>,
    expanded: &mut Expanded,
) -> Result<(), ConfigError> {
    match value {
        Value::String(text) if text.contains('$') => {
            let whole = is_one_reference(text);
            let result = expand_text(text, lookup).map_err(|message| ConfigError::Invalid {
                path: if at.path.is_empty() {
                    "(top level)".into()
                } else {
                    at.path.clone()
                },
                message,
            })?;
            if let Some(typed) = whole.then(|| retyped(&result)).flatten() {
                expanded
                    .0
                    .push((at.path.clone(), at.pointer.clone(), typed));
            }
            *value = Value::String(result);
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let (len, plen) = (at.path.len(), at.pointer.len());
                at.path.push_str(&format!("[{i}]"));
                at.pointer.push_str(&format!("/{i}"));
                walk(item, at, lookup, expanded)?;
                at.path.truncate(len);
                at.pointer.truncate(plen);
            }
        }
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                let (len, plen) = (at.path.len(), at.pointer.len());
                if !at.path.is_empty() {
                    at.path.push('.');
                }
                at.path.push_str(key);
                at.pointer.push('/');
                at.pointer
                    .push_str(&key.replace('~', "~0").replace('/', "~1"));
                walk(item, at, lookup, expanded)?;
                at.path.truncate(len);
                at.pointer.truncate(plen);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether `text` is a single `${…}` and nothing else.
fn is_one_reference(text: &str) -> bool {
    text.starts_with("${") && text.ends_with('}') && text[2..].find('}') == Some(text.len() - 3)
}

/// A number or a boolean, when the text reads as one.
fn retyped(text: &str) -> Option<Value> {
    match serde_saphyr::from_str::<Value>(text) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => Some(v),
        _ => None,
    }
}

fn expand_text(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(more) = after.strip_prefix('$') {
            out.push('$');
            rest = more;
        } else if let Some(reference) = after.strip_prefix('{') {
            let end = reference
                .find('}')
                .ok_or_else(|| format!("\"${{\" without a closing \"}}\" in {text:?}"))?;
            let (name, default) = match reference[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&reference[..end], None),
            };
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "{name:?} is not an environment variable name (in {text:?}; a literal \"$\" is written \"$$\")"
                ));
            }
            let found = lookup(name);
            let value = match (found, default) {
                (Some(v), Some(d)) if v.is_empty() => d.to_owned(),
                (Some(v), _) => v,
                (None, Some(d)) => d.to_owned(),
                (None, None) => {
                    return Err(format!("environment variable {name} is not set"));
                }
            };
            if value.contains(['\n', '\r']) {
                return Err(format!(
                    "environment variable {name} holds a line break, which no config value has"
                ));
            }
            out.push_str(&value);
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "NS" => Some("shop".into()),
            "PORT" => Some("8443".into()),
            "EMPTY" => Some(String::new()),
            "FLAG" => Some("true".into()),
            _ => None,
        }
    }

    fn expanded(yaml: &str) -> Result<Value, String> {
        let mut v: Value = serde_saphyr::from_str(yaml).unwrap();
        expand(&mut v, &env).map_err(|e| e.to_string())?;
        Ok(v)
    }

    #[test]
    fn a_whole_reference_is_retyped_where_the_key_asks_for_it() {
        let mut v: Value =
            serde_saphyr::from_str("a:\n  port: ${PORT}\n  mixed: ${PORT}x\n  on: [\"${FLAG}\"]\n")
                .unwrap();
        let mut typed = expand(&mut v, &env).unwrap();
        assert_eq!(v["a"]["port"], "8443", "text until a key asks for more");
        assert!(typed.retype(&mut v, "a.port"));
        assert_eq!(v["a"]["port"], 8443);
        assert!(!typed.retype(&mut v, "a.port"), "once");
        assert!(!typed.retype(&mut v, "a.mixed"), "not a whole reference");
        assert!(typed.retype(&mut v, "a.on[0]"));
        assert_eq!(v["a"]["on"][0], true);
    }

    #[test]
    fn references_defaults_escapes_and_types() {
        let v = expanded(
            "id: spiffe://cluster.local/ns/${NS}/sa/web\n\
             port: ${PORT}\n\
             quoted: \"${PORT}\"\n\
             mixed: ${PORT}x\n\
             flag: ${FLAG}\n\
             dflt: ${MISSING:-fallback}\n\
             empty_dflt: ${EMPTY:-used}\n\
             empty: ${EMPTY}\n\
             money: $$5 and $ alone\n\
             list: [\"${NS}\", plain]\n",
        )
        .unwrap();
        assert_eq!(v["id"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(v["port"], "8443");
        assert_eq!(v["quoted"], "8443");
        assert_eq!(v["mixed"], "8443x");
        assert_eq!(v["flag"], "true");
        assert_eq!(v["dflt"], "fallback");
        assert_eq!(v["empty_dflt"], "used");
        assert_eq!(v["empty"], "");
        assert_eq!(v["money"], "$5 and $ alone");
        assert_eq!(v["list"][0], "shop");
    }

    #[test]
    fn an_unset_or_malformed_reference_names_the_key() {
        let e = expanded("identity:\n  id: spiffe://td/ns/${POD_NS}/sa/x\n").unwrap_err();
        assert!(
            e.contains("identity.id") && e.contains("POD_NS is not set"),
            "{e}"
        );
        let e = expanded("a:\n  b: [x, \"${NS\"]\n").unwrap_err();
        assert!(e.contains("a.b[1]") && e.contains("closing"), "{e}");
        let e = expanded("a: \"${1X}\"\n").unwrap_err();
        assert!(e.contains("not an environment variable name"), "{e}");
        // A key is never expanded, and a value without `$` is left alone.
        let v = expanded("\"${NS}\": 1\nb: plain\n").unwrap();
        assert_eq!(v["${NS}"], 1);
    }
}
