//! [`StaticRegistry`]: a name-to-backend map that exports can be added to and removed from
//! while the server runs. It owns the map only; it must never open files or serve requests.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::backend::{BlockBackend, ExportRegistry};

struct Export {
    backend: Arc<dyn BlockBackend>,
    description: String,
}

/// Exports by name. Lookups take a read lock, so they never wait on each other; removing an
/// export only affects later handshakes; connections already serving it keep their backend
/// until `NbdServer::close_export_connections`.
#[derive(Default)]
pub struct StaticRegistry {
    exports: RwLock<BTreeMap<String, Export>>,
}

impl StaticRegistry {
    pub fn new() -> StaticRegistry {
        StaticRegistry::default()
    }

    /// Adds or replaces an export; returns the backend it replaced.
    pub fn add(
        &self,
        name: impl Into<String>,
        backend: Arc<dyn BlockBackend>,
    ) -> Option<Arc<dyn BlockBackend>> {
        self.add_with_description(name, String::new(), backend)
    }

    /// Adds or replaces an export with a description shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub fn add_with_description(
        &self,
        name: impl Into<String>,
        description: impl Into<String>,
        backend: Arc<dyn BlockBackend>,
    ) -> Option<Arc<dyn BlockBackend>> {
        let export = Export {
            backend,
            description: description.into(),
        };
        self.exports
            .write()
            .insert(name.into(), export)
            .map(|old| old.backend)
    }

    /// Removes an export; returns its backend.
    pub fn remove(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        self.exports.write().remove(name).map(|old| old.backend)
    }

    /// Number of exports.
    pub fn len(&self) -> usize {
        self.exports.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.exports.read().is_empty()
    }
}

impl ExportRegistry for StaticRegistry {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockBackend>> {
        self.exports
            .read()
            .get(name)
            .map(|e| Arc::clone(&e.backend))
    }

    fn list(&self) -> Vec<(String, String)> {
        self.exports
            .read()
            .iter()
            .map(|(n, e)| (n.clone(), e.description.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBackend;

    #[test]
    fn add_lookup_remove() {
        let reg = StaticRegistry::new();
        assert!(reg.lookup("a").is_none());
        assert!(reg
            .add_with_description("a", "first", Arc::new(MemoryBackend::new(512)))
            .is_none());
        assert!(reg.add("b", Arc::new(MemoryBackend::new(1024))).is_none());
        assert_eq!(reg.lookup("b").map(|b| b.size_bytes()), Some(1024));
        assert_eq!(
            reg.list(),
            vec![("a".into(), "first".into()), ("b".into(), String::new())]
        );
        assert!(reg.remove("a").is_some());
        assert!(reg.lookup("a").is_none());
        assert_eq!(reg.len(), 1);
    }
}
