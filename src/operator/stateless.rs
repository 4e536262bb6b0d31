//! The stateless operator: column selection, filters and projections, batch by batch.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;

use super::{LateRows, Operator, Step, explain_steps, run_steps};

#[derive(Debug)]
pub struct StatelessOperator {
    pub name: String,
    pub input: String,
    pub steps: Vec<Step>,
    pub input_schema: SchemaRef,
    pub schema: SchemaRef,
}

impl Operator for StatelessOperator {
    fn name(&self) -> &str {
        &self.name
    }
    fn input(&self) -> &str {
        &self.input
    }
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn process_batch(
        &mut self,
        batch: &RecordBatch,
        out: &mut Vec<RecordBatch>,
        _late: &mut Vec<LateRows>,
    ) -> Result<(), DataFusionError> {
        let result = run_steps(&self.steps, batch)?;
        if result.num_rows() > 0 {
            out.push(result);
        }
        Ok(())
    }
    fn explain(&self) -> String {
        let fields: Vec<String> = self
            .schema
            .fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect();
        format!(
            "query {} (stateless: rows pass through as they arrive; no state)\n{}  Output: {}\n",
            self.name,
            explain_steps(&self.steps, &self.input_schema, &self.input, "  "),
            fields.join(", ")
        )
    }
}
