//! Inode numbers: one per name, stable for the mount's life.
//!
//! Each virtual directory (by its path) and each blob id gets an inode
//! number the first time it is looked up, and keeps it until the mount
//! ends, so `stat` shows one inode per id however often the kernel forgets
//! it. Numbers are never reused, so the FUSE generation is always 0. What
//! a number costs once the kernel has forgotten it is its name; the blob
//! (its fd and token) is dropped with the kernel's last reference.

use super::blob::BlobFile;
use std::collections::HashMap;
use std::sync::Arc;

/// The root directory's inode number (FUSE's).
pub const ROOT: u64 = 1;

/// What an inode is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The mount's root.
    Root,
    /// A virtual directory: a registry host or a repository path below it.
    Dir(String),
    /// A blob, by id.
    File(String),
}

struct Node {
    kind: Kind,
    /// The kernel's references (lookups not yet forgotten).
    lookups: u64,
    /// The open blob while the kernel holds the inode.
    blob: Option<Arc<BlobFile>>,
}

/// The inode table.
pub struct Table {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<Kind, u64>,
    next: u64,
}

impl Default for Table {
    fn default() -> Self {
        Table::new()
    }
}

impl Table {
    pub fn new() -> Table {
        let mut t = Table {
            nodes: HashMap::new(),
            by_name: HashMap::new(),
            next: ROOT + 1,
        };
        t.nodes.insert(
            ROOT,
            Node {
                kind: Kind::Root,
                lookups: 1,
                blob: None,
            },
        );
        t.by_name.insert(Kind::Root, ROOT);
        t
    }

    /// What inode `ino` is, and its blob if it is an open file.
    pub fn get(&self, ino: u64) -> Option<(Kind, Option<Arc<BlobFile>>)> {
        self.nodes
            .get(&ino)
            .map(|n| (n.kind.clone(), n.blob.clone()))
    }

    /// The open blob of id `id`, if the kernel holds its inode.
    pub fn open_blob(&self, id: &str) -> Option<Arc<BlobFile>> {
        let ino = self.by_name.get(&Kind::File(id.to_string()))?;
        self.nodes.get(ino)?.blob.clone()
    }

    /// Counts one lookup of `kind` (a directory, or a file with its blob,
    /// kept unless the inode already holds one); returns its number and
    /// its blob.
    pub fn add_lookup(
        &mut self,
        kind: Kind,
        blob: Option<Arc<BlobFile>>,
    ) -> (u64, Option<Arc<BlobFile>>) {
        let ino = match self.by_name.get(&kind) {
            Some(&ino) => ino,
            None => {
                let ino = self.next;
                self.next += 1;
                self.by_name.insert(kind.clone(), ino);
                self.nodes.insert(
                    ino,
                    Node {
                        kind,
                        lookups: 0,
                        blob: None,
                    },
                );
                ino
            }
        };
        let node = self.nodes.get_mut(&ino).expect("numbered node");
        node.lookups += 1;
        if node.blob.is_none() {
            node.blob = blob;
        }
        (ino, node.blob.clone())
    }

    /// The kernel dropped `n` references to `ino`; at zero its blob is
    /// closed (its number stays reserved for its name).
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                node.blob = None;
            }
        }
    }

    /// Inodes numbered so far (the root included).
    pub fn len(&self) -> u64 {
        self.nodes.len() as u64
    }

    /// Always false: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_per_name_and_never_reused() {
        let mut t = Table::new();
        let (a, _) = t.add_lookup(Kind::Dir("h:1".into()), None);
        let (b, _) = t.add_lookup(Kind::File("x".into()), None);
        assert_ne!(a, b);
        assert!(a > ROOT && b > ROOT);
        t.forget(b, 1);
        let (b2, _) = t.add_lookup(Kind::File("x".into()), None);
        assert_eq!(b, b2);
        let (c, _) = t.add_lookup(Kind::File("y".into()), None);
        assert!(c > b);
        assert_eq!(t.get(a).unwrap().0, Kind::Dir("h:1".into()));
        assert_eq!(t.len(), 4);
        t.forget(ROOT, 100);
        assert_eq!(t.get(ROOT).unwrap().0, Kind::Root);
    }
}
