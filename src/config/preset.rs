//! CRM presets: embedded YAML configs (quotas per plan, routes, CRM dialect) that a user's file is
//! merged onto before validation, so `preset: zendesk` + `plan: professional` + a URL is enough.

use yaml_serde::{Mapping, Value};

use super::{ConfigError, ConfigErrors};

/// Every preset: name and embedded YAML (`plans`, `default_plan`, `config`).
pub const PRESETS: &[(&str, &str)] = &[
    ("zendesk", include_str!("presets/zendesk.yaml")),
    ("salesforce", include_str!("presets/salesforce.yaml")),
    ("hubspot", include_str!("presets/hubspot.yaml")),
    ("freshdesk", include_str!("presets/freshdesk.yaml")),
    ("kustomer", include_str!("presets/kustomer.yaml")),
    ("servicenow", include_str!("presets/servicenow.yaml")),
    ("dynamics", include_str!("presets/dynamics.yaml")),
];

fn error(path: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        path: path.to_string(),
        message,
    }])
}

/// The document itself when it names no preset; else the preset's config for the chosen plan
/// with the document merged onto it. The document's `preset` and `plan` keys are kept.
pub(super) fn apply(doc: Value) -> Result<Value, ConfigErrors> {
    let Value::Mapping(map) = &doc else {
        return Ok(doc);
    };
    let Some(preset) = map.get("preset") else {
        if map.contains_key("plan") {
            return Err(error("plan", "applies only together with preset".into()));
        }
        return Ok(doc);
    };
    let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
    let Some((name, text)) = preset
        .as_str()
        .and_then(|p| PRESETS.iter().find(|(n, _)| *n == p))
    else {
        let shown = preset
            .as_str()
            .map_or_else(|| format!("{preset:?}"), |s| format!("{s:?}"));
        return Err(error(
            "preset",
            format!("{shown} is not a preset (one of: {})", names.join(", ")),
        ));
    };
    let def: Value = yaml_serde::from_str(text)
        .unwrap_or_else(|e| panic!("embedded preset {name} is not YAML: {e}"));
    let plans = def["plans"].as_mapping().cloned().unwrap_or_default();
    let plan_name = match map.get("plan") {
        Some(p) => p.as_str().unwrap_or("").to_string(),
        None => def["default_plan"].as_str().unwrap_or("").to_string(),
    };
    let Some(limits) = plans.get(plan_name.as_str()).and_then(Value::as_mapping) else {
        let known: Vec<&str> = plans.keys().filter_map(Value::as_str).collect();
        return Err(error(
            "plan",
            format!(
                "{plan_name:?} is not a {name} plan (one of: {})",
                known.join(", ")
            ),
        ));
    };
    let mut base = def["config"].clone();
    if let Some(quotas) = base.get_mut("quotas").and_then(Value::as_sequence_mut) {
        for q in quotas.iter_mut() {
            let qname = q["name"].as_str().unwrap_or("").to_string();
            if let Some(limit) = limits.get(qname.as_str())
                && let Some(m) = q.as_mapping_mut()
            {
                m.insert("limit".into(), limit.clone());
            }
        }
    }
    let mut with_plan = map.clone();
    with_plan.insert("plan".into(), Value::String(plan_name));
    Ok(merge(base, Value::Mapping(with_plan)))
}

/// `over` merged onto `base`: mappings key by key, `quotas` and `routes` item by item by `name`
/// (a user's new routes come first, so they are matched before the preset's), anything else replaced.
fn merge(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Mapping(mut base), Value::Mapping(over)) => {
            for (key, value) in over {
                let merged = match (key.as_str(), base.remove(&key), value) {
                    (
                        Some(list @ ("quotas" | "routes")),
                        Some(Value::Sequence(b)),
                        Value::Sequence(o),
                    ) => Value::Sequence(merge_named(b, o, list == "routes")),
                    (_, Some(b), o) => merge(b, o),
                    (_, None, o) => o,
                };
                base.insert(key, merged);
            }
            Value::Mapping(base)
        }
        (_, over) => over,
    }
}

fn merge_named(base: Vec<Value>, over: Vec<Value>, new_first: bool) -> Vec<Value> {
    let name = |v: &Value| v.get("name").and_then(Value::as_str).map(str::to_string);
    let mut out = base;
    let mut added = Vec::new();
    for item in over {
        match name(&item).and_then(|n| out.iter().position(|b| name(b).as_deref() == Some(&n))) {
            Some(i) => {
                let b = std::mem::replace(&mut out[i], Value::Null);
                out[i] = merge(b, item);
            }
            None => added.push(item),
        }
    }
    if new_first {
        added.extend(out);
        added
    } else {
        out.extend(added);
        out
    }
}

/// Plan names of a preset (for documentation and tests).
pub fn plans(preset: &str) -> Vec<String> {
    PRESETS
        .iter()
        .find(|(n, _)| *n == preset)
        .and_then(|(_, text)| yaml_serde::from_str::<Value>(text).ok())
        .and_then(|v| v["plans"].as_mapping().cloned())
        .map(|m: Mapping| {
            m.keys()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
