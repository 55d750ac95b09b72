//! forward-auth: being implemented (see the open issue); refuses configuration until then.
use serde_json::Value;

use super::{BuildContext, Ctx, Outcome};

#[derive(Debug)]
pub struct Plugin;

#[derive(Debug, Default)]
pub struct Shared;

impl Plugin {
    pub fn compile(_conf: &Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        Err("not available in this build yet".into())
    }

    pub async fn run(&self, _cx: &mut Ctx<'_>) -> Outcome {
        Outcome::Continue
    }
}

impl Plugin {
    pub fn owned_headers(&self) -> Vec<String> {
        Vec::new()
    }
}
