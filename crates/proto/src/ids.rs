//! Identifier newtypes used by every crate: a VM name validated once, the relationship's
//! generation, a recovery point's sequence number, a disk's index, and the one limit on disks
//! per VM. Each serializes as its plain inner value (JSON string or number), so adopting them
//! changes no format.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest VM name. Names become directory names and NBD export names
/// (`<vm>/<disk>`, at most 4096 bytes in NBD): 64 keeps paths short and readable.
pub const VM_NAME_MAX: usize = 64;

/// Most disks one VM may have, on the primary, on the wire (delta header) and in the replica
/// store: one limit everywhere. 16 is more than the virtio slots a typical VM uses for data
/// disks, and keeps per-VM resources (bitmaps, descriptors, copy-before-write pools) bounded.
pub const DISKS_PER_VM_MAX: u32 = 16;

/// A VM name: 1-64 ASCII letters, digits, `.`, `_` or `-`, not starting with `-` or `.`.
/// Constructed only through [`VmName::parse`] (or deserialization, which calls it), so a value
/// of this type is always safe as a directory name and an NBD export prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

/// Why a string is not a [`VmName`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidVmName(pub String);

impl fmt::Display for InvalidVmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid VM name {:?}: use 1-{VM_NAME_MAX} letters, digits, '.', '_' or '-', not starting with '-' or '.'",
            self.0
        )
    }
}

impl std::error::Error for InvalidVmName {}

impl VmName {
    pub fn parse(name: &str) -> Result<VmName, InvalidVmName> {
        let ok_chars = name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
        if name.is_empty() || name.len() > VM_NAME_MAX || !ok_chars || name.starts_with(['-', '.'])
        {
            return Err(InvalidVmName(name.chars().take(VM_NAME_MAX + 8).collect()));
        }
        Ok(VmName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = InvalidVmName;
    fn try_from(s: String) -> Result<VmName, InvalidVmName> {
        VmName::parse(&s)
    }
}

impl From<VmName> for String {
    fn from(v: VmName) -> String {
        v.0
    }
}

impl std::str::FromStr for VmName {
    type Err = InvalidVmName;
    fn from_str(s: &str) -> Result<VmName, InvalidVmName> {
        VmName::parse(s)
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for VmName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for VmName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for VmName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> $name {
                $name(v)
            }
        }

        impl From<$name> for $inner {
            fn from(v: $name) -> $inner {
                v.0
            }
        }
    };
}

number_id!(
    /// The relationship's generation: a new one starts with every new initial replication of a
    /// VM to a replica, so deltas of an older life of the relationship are never applied.
    Generation(u64)
);
number_id!(
    /// A recovery point's sequence number within one generation: 1 is the initial
    /// replication's point, each later point is its parent + 1. 0 means "no point yet".
    Seq(u64)
);
number_id!(
    /// A disk's index within its VM (0-based, below [`DISKS_PER_VM_MAX`]).
    DiskIndex(u32)
);

impl Seq {
    /// The point after this one; saturates (2^64 points are never reached).
    pub const fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_validated_once_and_serialize_as_strings() {
        for ok in ["web", "web-0", "a.b_c", "A9", &"x".repeat(VM_NAME_MAX)] {
            let n = VmName::parse(ok).unwrap();
            assert_eq!(serde_json::to_string(&n).unwrap(), format!("\"{ok}\""));
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a/b",
            "a b",
            "é",
            &"x".repeat(VM_NAME_MAX + 1),
            "..",
        ] {
            assert!(VmName::parse(bad).is_err(), "{bad:?} accepted");
            assert!(serde_json::from_str::<VmName>(&format!("{bad:?}")).is_err());
        }
        let e = VmName::parse("a/b").unwrap_err().to_string();
        assert!(e.starts_with("invalid VM name \"a/b\""), "{e}");
    }

    #[test]
    fn numeric_ids_serialize_as_plain_numbers() {
        assert_eq!(serde_json::to_string(&Seq(7)).unwrap(), "7");
        assert_eq!(
            serde_json::from_str::<Generation>("3").unwrap(),
            Generation(3)
        );
        assert_eq!(Seq(u64::MAX).next(), Seq(u64::MAX));
        assert_eq!(DiskIndex(2).to_string(), "2");
    }
}
