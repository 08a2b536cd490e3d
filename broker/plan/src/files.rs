//! Profiles and networks from files: TOML or JSON (by extension), a single device
//! profile or a list of `[[device]]` entries, each inline or naming a profile file
//! (`profile = "jetson-agx-orin-64gb.toml"`, relative to the list) whose keys the
//! entry's other keys override.

use anyhow::Context;
use lime_schemas::{DeviceProfile, Links};
use serde_json::Value;
use std::path::Path;

fn read_value(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        toml::from_str::<Value>(&text).with_context(|| format!("parsing {}", path.display()))?
    };
    Ok(value)
}

fn typed<T: serde::de::DeserializeOwned>(value: Value, path: &Path) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| anyhow::anyhow!("{}: `{}`: {}", path.display(), e.path(), e.inner()))
}

/// The devices a file describes, validated, names unique.
pub fn load_devices(path: &Path) -> anyhow::Result<Vec<DeviceProfile>> {
    let value = read_value(path)?;
    let entries = match value.get("device") {
        Some(Value::Array(list)) => list.clone(),
        Some(_) => anyhow::bail!("{}: `device` must be a list of tables", path.display()),
        None => vec![value],
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut devices: Vec<DeviceProfile> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let Value::Object(mut fields) = entry else {
            anyhow::bail!("{}: device {i} is not a table", path.display());
        };
        let merged = match fields.remove("profile") {
            Some(Value::String(file)) => {
                let base_path = dir.join(file);
                let Value::Object(mut base) = read_value(&base_path)? else {
                    anyhow::bail!("{}: not a table", base_path.display());
                };
                base.extend(fields);
                Value::Object(base)
            }
            Some(_) => anyhow::bail!("{}: device {i}: `profile` must be a path", path.display()),
            None => Value::Object(fields),
        };
        let profile: DeviceProfile = typed(merged, path)?;
        profile.validate()?;
        anyhow::ensure!(
            !devices.iter().any(|d| d.name == profile.name),
            "{}: two devices are named {:?}; give one a `name`",
            path.display(),
            profile.name
        );
        devices.push(profile);
    }
    anyhow::ensure!(!devices.is_empty(), "{}: no devices", path.display());
    Ok(devices)
}

/// The network a file describes, validated.
pub fn load_links(path: &Path) -> anyhow::Result<Links> {
    let links: Links = typed(read_value(path)?, path)?;
    links.validate()?;
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../profiles")
            .join(name)
    }

    #[test]
    fn the_shipped_profiles_load() {
        for cluster in ["jetsons-4.toml", "jetsons-5.toml"] {
            let devices = load_devices(&shipped(cluster)).unwrap();
            assert!(devices.iter().all(|d| d.estimate));
            assert_eq!(devices[0].name, "orin64");
        }
        for single in [
            "jetson-agx-orin-64gb.toml",
            "jetson-agx-orin-32gb.toml",
            "jetson-orin-nx-16gb.toml",
            "jetson-orin-nano-8gb.toml",
            "jetson-xavier-nx-16gb.toml",
        ] {
            assert_eq!(load_devices(&shipped(single)).unwrap().len(), 1);
        }
        assert_eq!(
            load_links(&shipped("links-100mbit.toml"))
                .unwrap()
                .default
                .mbit_per_s,
            100.0
        );
    }

    #[test]
    fn bad_files_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.toml");
        std::fs::write(&p, "[[device]]\nname = \"a\"\nmemory_bytes = \"lots\"\n").unwrap();
        let e = format!("{:#}", load_devices(&p).unwrap_err());
        assert!(e.contains("memory_bytes"), "{e}");
        std::fs::write(
            &p,
            "[[device]]\nprofile = \"x.toml\"\n[[device]]\nprofile = \"x.toml\"\n",
        )
        .unwrap();
        std::fs::copy(
            shipped("jetson-orin-nano-8gb.toml"),
            dir.path().join("x.toml"),
        )
        .unwrap();
        let e = format!("{:#}", load_devices(&p).unwrap_err());
        assert!(e.contains("two devices are named"), "{e}");
    }
}
