//! jwt-auth: being implemented (see the open issue); refuses configuration until then.
use serde_json::Value;

use super::{BuildContext, Ctx, Outcome};

#[derive(Debug)]
pub struct Plugin;

#[derive(Debug)]
pub struct Credential;

impl Plugin {
    pub fn compile(_conf: &Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        Err("not available in this build yet".into())
    }

    pub async fn run(&self, _cx: &mut Ctx<'_>) -> Outcome {
        Outcome::Continue
    }
}

impl Credential {
    pub fn compile(_conf: &Value) -> Result<(String, Self), String> {
        Err("not available in this build yet".into())
    }
}
