//! The Temporal Information Block as an analysis result: what `detect-tib` found and
//! `fold-tib` (and later passes) read.

use serde::Serialize;

/// A value of the TIB read by the rest of the network: a temporal feature emb_i(t).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FrontierValue {
    pub name: String,
    /// `f32[N,64]`-style type, as far as known.
    pub ty: String,
    /// The nodes outside the TIB reading it: `name (Op)`.
    pub joins: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TibAnalysis {
    /// The graph input carrying the time step.
    pub timestep_input: String,
    /// How it was found ("detected: reaches Sin/Cos ..." or "given by --timestep-input").
    pub found_by: String,
    /// The value the tables are indexed by: the time step after casts and broadcasts to
    /// the batch (rank 0 or 1), still holding time-step values.
    pub index_value: String,
    /// Nodes whose outputs depend on the time step alone (plus constants and shapes).
    pub tib_nodes: usize,
    /// Names of the nodes computable from `index_value` and constants: what folding
    /// removes. Topological order.
    pub fold_nodes: Vec<String>,
    /// The TIB values the rest of the network reads, in topological order.
    pub frontier: Vec<FrontierValue>,
}

impl TibAnalysis {
    pub fn text(&self) -> String {
        let mut s = format!(
            "time-step input: {} ({})\nindex value: {}\nTIB: {} nodes depend on the time step alone; {} fold into tables\nfrontier ({} values):\n",
            self.timestep_input,
            self.found_by,
            self.index_value,
            self.tib_nodes,
            self.fold_nodes.len(),
            self.frontier.len()
        );
        for f in &self.frontier {
            s.push_str(&format!(
                "  {}: {} → {}\n",
                f.name,
                f.ty,
                f.joins.join(", ")
            ));
        }
        s
    }
}
