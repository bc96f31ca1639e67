//! `portcullis top`: branches (tunnels, rates against their limits, holds) and the busiest
//! tunnels of a running gateway, asked from its admin listener each second and drawn with
//! ratatui in the terminal (80x24 is enough: the tables take what fits). Keys: `s` cycles the
//! tunnels' sort (rate, bytes, age), `b` cycles a branch filter through the branches shown,
//! `q` or Esc quits. When stdout is not a terminal it prints one plain table and exits.

use super::live::{self, BRANCH_HEADER, TUNNEL_HEADER};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::widgets::{Block, Paragraph, Row, Table};
use serde_json::Value;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const SORTS: [&str; 3] = ["rate", "bytes", "age"];
const REFRESH: Duration = Duration::from_secs(1);

/// What the view shows now.
struct View {
    admin: SocketAddr,
    fleet: bool,
    sort: usize,
    branch: Option<String>,
    branches: Value,
    tunnels: Value,
    problem: Option<String>,
}

impl View {
    fn fetch(&mut self) {
        let fleet = self.fleet.then(|| "true".to_owned());
        let branches = live::ask(
            self.admin,
            "GET",
            &format!("/branches?{}", live::query(&[("fleet", fleet)])),
        );
        let tunnels = live::ask(
            self.admin,
            "GET",
            &format!(
                "/tunnels?{}",
                live::query(&[
                    ("sort", Some(SORTS[self.sort].to_owned())),
                    ("branch", self.branch.clone()),
                    ("limit", Some("50".into())),
                ])
            ),
        );
        match (branches, tunnels) {
            (Ok(branches), Ok(tunnels)) => {
                self.branches = branches;
                self.tunnels = tunnels;
                self.problem = None;
            }
            (Err(e), _) | (_, Err(e)) => self.problem = Some(e),
        }
    }

    /// The next branch filter: each branch shown in turn, then none.
    fn next_branch(&mut self) {
        let names: Vec<String> = self.branches["branches"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter_map(|b| b["branch"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let at = self
            .branch
            .as_ref()
            .and_then(|current| names.iter().position(|n| n == current));
        self.branch = match at {
            None => names.first().cloned(),
            Some(i) => names.get(i + 1).cloned(),
        };
    }

    fn title(&self) -> String {
        let open = self.tunnels["open"].as_u64().unwrap_or(0);
        format!(
            " portcullis top  {}  {open} open  sort: {}  branch: {}  (s sort, b branch, q quit) ",
            self.admin,
            SORTS[self.sort],
            self.branch.as_deref().unwrap_or("all")
        )
    }

    fn draw(&self, frame: &mut ratatui::Frame<'_>) {
        let [top, bottom] =
            Layout::vertical([Constraint::Percentage(40), Constraint::Min(5)]).areas(frame.area());
        let bold = Style::default().add_modifier(Modifier::BOLD);
        let branches = live::branch_rows(&self.branches);
        let rows = branches.iter().map(|r| Row::new(r.clone()));
        let widths = [
            Constraint::Min(10),
            Constraint::Length(8),
            Constraint::Min(12),
            Constraint::Min(12),
            Constraint::Length(11),
        ];
        let table = Table::new(rows, widths)
            .header(Row::new(BRANCH_HEADER).style(bold))
            .block(Block::bordered().title(self.title()));
        frame.render_widget(table, top);
        if let Some(problem) = &self.problem {
            let text = Paragraph::new(problem.as_str()).block(Block::bordered().title(" error "));
            frame.render_widget(text, bottom);
            return;
        }
        let tunnels = live::tunnel_rows(&self.tunnels);
        let rows = tunnels.iter().map(|r| Row::new(r.clone()));
        let widths = [
            Constraint::Length(6),
            Constraint::Min(8),
            Constraint::Min(14),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Min(10),
            Constraint::Length(6),
            Constraint::Length(11),
        ];
        let table = Table::new(rows, widths)
            .header(Row::new(TUNNEL_HEADER).style(bold))
            .block(Block::bordered().title(" busiest tunnels "));
        frame.render_widget(table, bottom);
    }

    /// The same figures as plain tables.
    fn plain(&self) -> String {
        if let Some(problem) = &self.problem {
            return format!("{problem}\n");
        }
        let mut out = live::table(BRANCH_HEADER, &live::branch_rows(&self.branches));
        out.push('\n');
        out.push_str(&live::table(
            TUNNEL_HEADER,
            &live::tunnel_rows(&self.tunnels),
        ));
        out
    }
}

/// Runs the view until `q`; with stdout not a terminal, prints once. Err: why it cannot run.
pub fn run(admin: SocketAddr, fleet: bool) -> Result<(), String> {
    let mut view = View {
        admin,
        fleet,
        sort: 0,
        branch: None,
        branches: Value::Null,
        tunnels: Value::Null,
        problem: None,
    };
    view.fetch();
    if !std::io::stdout().is_terminal() {
        if let Some(problem) = view.problem {
            return Err(problem);
        }
        print!("{}", view.plain());
        return Ok(());
    }
    let mut terminal = ratatui::try_init().map_err(|e| format!("terminal: {e}"))?;
    let result = interact(&mut terminal, &mut view);
    ratatui::restore();
    result
}

fn interact(terminal: &mut ratatui::DefaultTerminal, view: &mut View) -> Result<(), String> {
    let mut fetched = Instant::now();
    loop {
        terminal
            .draw(|frame| view.draw(frame))
            .map_err(|e| format!("terminal: {e}"))?;
        let wait = REFRESH.saturating_sub(fetched.elapsed());
        if event::poll(wait).map_err(|e| format!("terminal: {e}"))?
            && let Event::Key(key) = event::read().map_err(|e| format!("terminal: {e}"))?
            && key.kind == KeyEventKind::Press
        {
            match key.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('s') => view.sort = (view.sort + 1) % SORTS.len(),
                KeyCode::Char('b') => view.next_branch(),
                _ => continue,
            }
            view.fetch();
            fetched = Instant::now();
            continue;
        }
        if fetched.elapsed() >= REFRESH {
            view.fetch();
            fetched = Instant::now();
        }
    }
}
