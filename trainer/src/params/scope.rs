//! Dotted parameter names built by scopes, the way candle's `VarBuilder::pp` pushes a path
//! component, instead of by string prefixes.

use std::fmt;

/// Where a layer's parameters live: a dotted path such as `main.down_blocks.1` (empty at
/// the root). [`Scope::pp`] descends one level, [`Scope::name`] names a tensor in it.
/// Constructors take `at: impl Into<Scope>`, so a dotted path as text works too
/// (`"main"`, or the name prefix `"main."`; `""` is the root).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    path: String,
}

impl Scope {
    /// The root: names carry no prefix.
    pub fn root() -> Self {
        Self::default()
    }

    /// The child scope `part` (a name, an index, or several dotted levels at once).
    pub fn pp(&self, part: impl fmt::Display) -> Self {
        Self { path: self.join(part) }
    }

    /// The full name of tensor `leaf` in this scope (`{path}.{leaf}`, or `leaf` at the root).
    pub fn name(&self, leaf: impl fmt::Display) -> String {
        self.join(leaf)
    }

    /// The dotted path (empty at the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether this is the root.
    pub fn is_root(&self) -> bool {
        self.path.is_empty()
    }

    /// Whether parameter `name` lies in this scope (`{path}.…`; every name at the root).
    pub fn contains(&self, name: &str) -> bool {
        self.is_root() || name.strip_prefix(self.path.as_str()).is_some_and(|rest| rest.starts_with('.'))
    }

    fn join(&self, part: impl fmt::Display) -> String {
        if self.path.is_empty() { part.to_string() } else { format!("{}.{part}", self.path) }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// A dotted path; one trailing `.` (a name prefix such as `main.`) is dropped.
impl From<&str> for Scope {
    fn from(path: &str) -> Self {
        Self { path: path.strip_suffix('.').unwrap_or(path).to_string() }
    }
}

impl From<String> for Scope {
    fn from(path: String) -> Self {
        Self::from(path.as_str())
    }
}

impl From<&Scope> for Scope {
    fn from(scope: &Scope) -> Self {
        scope.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::Scope;

    #[test]
    fn names_join_with_dots_and_none_at_the_root() {
        let down = Scope::root().pp("down_blocks").pp(1);
        assert_eq!(down.name("weight"), "down_blocks.1.weight");
        assert_eq!(Scope::root().name("weight"), "weight");
        assert_eq!(Scope::from("main.").pp("conv_in").name("bias"), "main.conv_in.bias");
        assert_eq!(Scope::from("main"), Scope::from("main."));
        assert!(Scope::from("").is_root());
        assert_eq!(down.to_string(), "down_blocks.1");
        assert!(down.contains("down_blocks.1.conv.weight") && !down.contains("down_blocks.10.conv.weight"));
        assert!(Scope::root().contains("conv_in.weight"));
    }
}
